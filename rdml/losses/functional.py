"""The triplet kernels every defense and attack shares."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def triplet_loss(emb: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float = 0.2,
                 reduction: str = "mean") -> Tensor:
    """max(0, d(a_i,p_i) - d(a_i,n_i) + margin), ``F.pairwise_distance`` semantics (eps 1e-6).

    ``reduction="mean"`` averages over all triplets (robrank); ``"nonzero_mean"`` over the triplets
    with a non-zero loss only (pytorch-metric-learning's ``AvgNonZeroReducer``, which Panum et al.'s
    code uses), 0 when every triplet is satisfied.
    """
    if reduction == "mean":
        return F.triplet_margin_loss(emb[a], emb[p], emb[n], margin=margin, p=2.0, eps=1e-6, reduction="mean")
    if reduction != "nonzero_mean":
        raise ValueError(f"reduction must be mean or nonzero_mean, got {reduction!r}")
    per = F.triplet_margin_loss(emb[a], emb[p], emb[n], margin=margin, p=2.0, eps=1e-6, reduction="none")
    return per.sum() / (per.detach() > 0).sum().clamp_min(1)


def hardness(emb: Tensor, a: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """Per-triplet hardness H = d(a,p) - d(a,n) in [-2, 2] on unit vectors; the triplet loss is max(0, H + margin)."""
    return F.pairwise_distance(emb[a], emb[p]) - F.pairwise_distance(emb[a], emb[n])
