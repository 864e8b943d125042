"""ResNet-18/50 (torchvision, weights=None) with a linear embedding head.

The classifier ``fc`` is replaced by Linear(feat, embedding_dim) (robrank's ``rres18``). ImageNet
mean/std normalisation happens inside forward, so attacks work in [0,1] pixel space; 1-channel inputs
are repeated to 3 channels. BatchNorm is frozen by default (robrank / Roth et al.: BN layers in eval
mode, affine parameters still trainable).

Weights cannot be downloaded here: ImageNet initialisation comes from a local torchvision state_dict
(``model.pretrained``), loaded into the backbone with the fc layer left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from rdml._torchvision_compat import import_torchvision
from rdml.errors import RdmlError
from rdml.models.base import EmbeddingModel

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILES = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


class ResNetEmbedding(EmbeddingModel):
    def __init__(
        self,
        arch: str = "resnet18",
        embedding_dim: int = 512,
        in_channels: int = 3,
        freeze_bn: bool = True,
        pretrained: Path | str | None = None,
    ) -> None:
        super().__init__(embedding_dim, freeze_bn=freeze_bn)
        if arch not in WEIGHT_FILES:
            raise RdmlError(f"unknown ResNet arch {arch!r}; choose one of {sorted(WEIGHT_FILES)}")
        if in_channels not in (1, 3):
            raise RdmlError(f"{arch} takes 1- or 3-channel images, got {in_channels} channels")
        tv = import_torchvision()
        backbone = getattr(tv.models, arch)(weights=None)
        self.arch = arch
        self.in_channels = in_channels
        if pretrained is not None:
            load_backbone_weights(backbone, Path(pretrained), arch)
        else:
            log.warning("%s: no model.pretrained weights set, training from scratch (random init)", arch)
        feat = backbone.fc.in_features
        backbone.fc = nn.Linear(feat, embedding_dim)
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train()  # applies the BN freeze from the start

    def normalize_input(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def load_backbone_weights(backbone: nn.Module, path: Path, arch: str) -> None:
    """Load a torchvision ImageNet state_dict into ``backbone``, ignoring only the classifier ``fc``."""
    if not path.is_file():
        url = WEIGHT_FILES[arch]
        raise RdmlError(
            f"pretrained weights {path} not found. Weights cannot be downloaded from here: fetch "
            f"{url.rsplit('/', 1)[-1]} from {url} on a machine with internet access, copy it to this "
            f"machine and set model.pretrained=/path/to/{url.rsplit('/', 1)[-1]} (or model.pretrained=null "
            "to train from scratch)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise RdmlError(f"cannot read pretrained weights {path}: {exc}; expected a torchvision state_dict .pth") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RdmlError(f"pretrained weights {path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise RdmlError(f"pretrained weights {path} do not fit {arch}: {exc}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise RdmlError(
            f"pretrained weights {path} do not match {arch}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}; "
            f"use the torchvision {arch} ImageNet state_dict ({WEIGHT_FILES[arch].rsplit('/', 1)[-1]})"
        )
    log.info("loaded %s backbone weights from %s", arch, path)
