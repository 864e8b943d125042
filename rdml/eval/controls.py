"""Control models every robustness table needs beside the defenses: the floor and a scale-only change.

* :func:`untrained_model`: the model a recipe starts from at a given seed (the exact initial weights of
  :func:`rdml.train.fit` with that seed). Whatever a trained model scores, the untrained one shows
  what the architecture and the protocol give for free: on small same-class test sets an untrained
  C2F2 already retrieves well and its ERS is not zero.
* :class:`ShrunkModel`: a trained model whose embedding is multiplied by a constant ``scale`` < 1. Every
  ranking, every retrieval and every attack's adversarial example stay the same (PGD's sign steps and
  each objective's argmin do not depend on the scale), but absolute distances shrink, so ES:D shrinks and
  ERS rises: a model can gain ERS without any robustness. The spread-normalised ES:D
  (``attacks.ES:D/spread``) of the shrunk copy equals the original's.
"""

from __future__ import annotations

from torch import Tensor, nn

SHRINK_SCALE = 0.05
"""The control's scale: its RMS pairwise distance (~0.07 for a healthy 512-d model) stays above the
collapse flag's 0.05, i.e. the flag does not catch it."""


class ShrunkModel(nn.Module):
    """``scale * model(x)``: the same ranking, an embedding ``scale`` times smaller (a control, not a defense)."""

    def __init__(self, model: nn.Module, scale: float = SHRINK_SCALE) -> None:
        super().__init__()
        if not 0 < scale:
            raise ValueError(f"scale must be positive, got {scale}")
        self.inner = model
        self.scale = float(scale)
        self.embedding_dim = getattr(model, "embedding_dim", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.inner(x)


def untrained_model(cfg, in_channels: int, image_size: int) -> nn.Module:
    """The initial model of ``fit(cfg)`` (same seed derivation, same build order), in eval mode."""
    from rdml.models import build_model
    from rdml.train.seeding import derive_seed, seed_everything

    seed_everything(derive_seed(cfg.train.seed))
    return build_model(cfg.model, in_channels=in_channels, image_size=image_size).eval()
