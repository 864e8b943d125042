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


def inverse_sphere_log_density(d: Tensor, dim: int, cutoff: float = 0.5) -> Tensor:
    """log of 1/q(d) for distances between random points on the unit sphere in R^dim (Wu et al. 2017).

    q(d) ∝ d^(dim-2) (1 - d²/4)^((dim-3)/2). Distances are clamped below at ``cutoff`` (Wu et al.'s 0.5,
    which keeps near-duplicates from dominating) and just below 2 so the log stays finite.
    """
    d = d.clamp(min=cutoff, max=2.0 - 1e-4)
    log_q = (dim - 2.0) * torch.log(d) + ((dim - 3.0) / 2.0) * torch.log((1.0 - 0.25 * d * d).clamp_min(1e-12))
    return -log_q
