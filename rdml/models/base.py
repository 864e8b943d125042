"""The embedding-model contract shared by every backbone.

``EmbeddingModel.forward`` takes images in [0,1] pixel space and returns L2-normalised embeddings.
Input normalisation (e.g. ImageNet mean/std) happens *inside* forward, so every attack and every
eps-ball lives in raw pixel space (the RobRank convention). BatchNorm freezing (Roth et al. 2020,
robrank): frozen BN layers stay in eval mode even after ``.train()``, so their running statistics
never move, while their affine parameters still receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EmbeddingModel(nn.Module):
    """Base class: subclasses implement :meth:`features` (normalised input -> raw embedding)."""

    embedding_dim: int

    def __init__(self, embedding_dim: int, freeze_bn: bool = False) -> None:
        super().__init__()
        self.embedding_dim = int(embedding_dim)
        self.freeze_bn = bool(freeze_bn)

    def normalize_input(self, x: Tensor) -> Tensor:
        """Map [0,1] pixels to what the backbone expects; identity by default."""
        return x

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.features(self.normalize_input(x)), p=2, dim=-1)

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Like ``nn.Module.train`` but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def bn_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _probe_output_size(module: nn.Module, in_channels: int, image_size: int) -> int:
    """Flattened output size of ``module`` for one input of the given shape (no training side effects)."""
    was_training = module.training
    module.eval()
    out = module(torch.zeros(1, in_channels, image_size, image_size))
    module.train(was_training)
    return int(out.flatten(1).shape[1])
