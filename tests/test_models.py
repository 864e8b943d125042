"""Models: shapes, normalised outputs, BN freezing, pretrained-weight loading and its errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from rdml.config import ModelConfig
from rdml.errors import ConfigError, RdmlError
from rdml.models import C2F2, EmbeddingModel, ResNetEmbedding, build_model


def test_c2f2_matches_spec_for_28x28():
    model = build_model(ModelConfig(arch="c2f2", embedding_dim=512), in_channels=1, image_size=28)
    assert isinstance(model, C2F2) and model.embedding_dim == 512
    assert model.flat_features == 3136  # 64 x 7 x 7, as robrank's rc2f2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 1024), (1024, 512)]
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_c2f2_other_sizes_and_channels():
    model = build_model(ModelConfig(arch="c2f2", embedding_dim=16), in_channels=3, image_size=8)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 16)


def test_resnet18_builds_and_runs_on_cpu(caplog):
    """Also verifies the torchvision-on-CPU-torch workaround (import via rdml._torchvision_compat)."""
    with caplog.at_level(logging.WARNING):
        model = build_model(ModelConfig(arch="resnet18", embedding_dim=32), in_channels=3, image_size=64)
    assert any("from scratch" in r.message for r in caplog.records)
    assert isinstance(model, ResNetEmbedding) and model.backbone.fc.out_features == 32
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    out1 = model(torch.rand(2, 1, 64, 64))  # grey images are repeated to 3 channels
    assert out1.shape == (2, 32)


def test_resnet_normalises_inside_forward():
    model = ResNetEmbedding("resnet18", embedding_dim=8, freeze_bn=True)
    x = torch.full((1, 3, 4, 4), 0.485)
    assert model.normalize_input(x)[0, 0].abs().max() < 1e-6  # the ImageNet mean maps to 0


def test_frozen_bn_stays_eval_and_affine_trains():
    model = build_model(ModelConfig(arch="resnet18", embedding_dim=8), in_channels=3, image_size=32)
    assert model.freeze_bn  # None -> frozen for ResNets
    model.train()
    bns = model.bn_layers()
    assert bns and all(not bn.training for bn in bns)
    assert model.backbone.conv1.training  # the rest is in train mode
    before = bns[0].running_mean.clone()
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert torch.equal(bns[0].running_mean, before)  # running stats do not move
    assert bns[0].weight.grad is not None  # affine params still train
    unfrozen = build_model(ModelConfig(arch="resnet18", embedding_dim=8, freeze_bn=False), 3, 32).train()
    assert all(bn.training for bn in unfrozen.bn_layers())


def test_pretrained_weights_roundtrip(tmp_path):
    """A torchvision state_dict (with its 1000-way fc) loads into the backbone; fc is ours."""
    from rdml._torchvision_compat import import_torchvision

    tv = import_torchvision()
    ref = tv.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", embedding_dim=16, pretrained=path), 3, 32)
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert model.backbone.fc.out_features == 16


def test_pretrained_errors(tmp_path):
    with pytest.raises(RdmlError, match=r"cannot be downloaded.*resnet18-f37072fd\.pth.*model\.pretrained"):
        build_model(ModelConfig(arch="resnet18", pretrained=tmp_path / "missing.pth"), 3, 32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1), "foo": torch.zeros(1)}, wrong)
    with pytest.raises(RdmlError, match="do not"):
        build_model(ModelConfig(arch="resnet18", pretrained=wrong), 3, 32)
    with pytest.raises(ConfigError):
        build_model(ModelConfig(arch="c2f2", pretrained=wrong), 1, 28)


def test_embedding_model_is_the_base():
    assert issubclass(C2F2, EmbeddingModel) and issubclass(ResNetEmbedding, EmbeddingModel)
