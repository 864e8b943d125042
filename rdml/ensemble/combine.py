"""The ensemble's embedding: one ``nn.Module`` that every evaluation and attack can use.

``concat`` (default, docs/methods.md#eat-ke-2025): g(x) = [f_1(x), ..., f_M(x)] / sqrt(M) with each f_m
L2-normalised, so g is unit-norm and ||g(x) - g(x')||^2 is the *mean* of the members' squared
distances; an ensemble of identical members therefore has exactly the distances of one member.
``mean``: normalise(mean_m f_m(x)).

The module is differentiable end to end (no detach, no argmax), so a white-box attack on the
ensemble is an attack on the combination, not on a single member: the adaptive attack of A.8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COMBINE_MODES = ("concat", "mean")


def combine_embeddings(embeddings: Sequence[Tensor], mode: str = "concat") -> Tensor:
    """Combine members' embeddings of the same inputs ([n, d_m] each) into one [n, D] embedding."""
    normed = [F.normalize(e, dim=1) for e in embeddings]
    if mode == "concat":
        return torch.cat(normed, dim=1) / math.sqrt(len(normed))
    if mode == "mean":
        dims = {e.shape[1] for e in normed}
        if len(dims) != 1:
            raise ValueError(f"combine=mean needs equal member embedding sizes, got {sorted(dims)}")
        return F.normalize(torch.stack(normed).mean(0), dim=1)
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")


class EnsembleModel(nn.Module):
    """Maps [0,1] images to the combined embedding of its members (an ``EmbeddingModel`` look-alike)."""

    def __init__(self, members: Sequence[nn.Module], combine: str = "concat") -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        dims = [int(getattr(m, "embedding_dim", 0)) for m in members]
        self.embedding_dim = sum(dims) if combine == "concat" else dims[0]

    def forward(self, x: Tensor) -> Tensor:
        return combine_embeddings([m(x) for m in self.members], self.combine)

    def member(self, k: int) -> nn.Module:
        return self.members[k]


def ensemble_from_states(
    model_cfg, in_channels: int, image_size: int, states, combine: str = "concat", device: str = "cpu"
) -> EnsembleModel:
    """Rebuild the combined model from the members' weights (e.g. fetched from member actors)."""
    from rdml.models import build_model

    members = []
    for state in states:
        m = build_model(model_cfg, in_channels, image_size)
        m.load_state_dict(state)
        members.append(m)
    return EnsembleModel(members, combine).to(device).eval()
