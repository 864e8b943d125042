"""Distances on the normalised metric ("N" in robrank): Euclidean distance between L2-normalised vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_distance_matrix(embeddings: Tensor, normalize: bool = True) -> Tensor:
    """[n, n] Euclidean distances; on unit vectors they lie in [0, 2]. Exact zeros on the diagonal."""
    x = F.normalize(embeddings, dim=-1) if normalize else embeddings
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def inverse_sphere_log_density(d: Tensor, dim: int, cutoff: float | None = None) -> Tensor:
    """log of 1/q(d) for distances between random points on the unit sphere in R^dim (Wu et al. 2017).

    q(d) ∝ d^(dim-2) (1 - d²/4)^((dim-3)/2). robrank's distance-weighted sampler (the ``distance``
    sampler) uses no cutoff, so by default distances are only kept inside (1e-6, 2 - 1e-4) for a finite
    log; Wu et al. and pytorch-metric-learning's miner clamp below at 0.5 (``cutoff``), which keeps
    near-duplicates from dominating.
    """
    d = d.clamp(min=1e-6 if cutoff is None else cutoff, max=2.0 - 1e-4)
    log_q = (dim - 2.0) * torch.log(d) + ((dim - 3.0) / 2.0) * torch.log((1.0 - 0.25 * d * d).clamp_min(1e-12))
    return -log_q
