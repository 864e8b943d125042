"""Build an :class:`EmbeddingModel` from a :class:`rdml.config.ModelConfig`."""

from __future__ import annotations

from rdml.errors import ConfigError
from rdml.models.base import EmbeddingModel
from rdml.models.c2f2 import C2F2
from rdml.models.resnet import ResNetEmbedding

ARCHS = ("c2f2", "resnet18", "resnet50")
"""The backbones :func:`build_model` builds (the config's allowed ``model.arch`` values)."""


def build_model(cfg, in_channels: int, image_size: int) -> EmbeddingModel:
    """The model named by ``cfg.arch`` for images of ``in_channels`` x ``image_size`` x ``image_size``.

    ``cfg.freeze_bn`` None means: frozen for ResNets (robrank), irrelevant for c2f2 (no BN).
    """
    if cfg.arch == "c2f2":
        if cfg.pretrained is not None:
            raise ConfigError("model.pretrained is only supported for ResNets; set model.pretrained=null for c2f2")
        return C2F2(in_channels=in_channels, image_size=image_size, embedding_dim=cfg.embedding_dim)
    if cfg.arch in ("resnet18", "resnet50"):
        freeze = True if cfg.freeze_bn is None else bool(cfg.freeze_bn)
        return ResNetEmbedding(
            cfg.arch, embedding_dim=cfg.embedding_dim, in_channels=in_channels, freeze_bn=freeze, pretrained=cfg.pretrained
        )
    raise ConfigError(f"model.arch={cfg.arch!r} is not supported; choose c2f2, resnet18 or resnet50")
