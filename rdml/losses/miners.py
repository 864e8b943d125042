"""In-batch triplet miners (the "samplers" of robrank's ``losses/miner.py``; config key ``loss.sampler``), vectorised and seedable.

Batch layouts:

* ``"pairs"`` (SPC-2, the robrank layout): ``[x1a, x1b, x2a, x2b, ...]``; anchor i is position 2i and
  its default positive is its partner 2i+1, so a batch of 2B images gives B triplets.
* ``"m_per_class"``: every sample is an anchor; the default positive is a uniformly random *other*
  sample of the anchor's class (the anchor itself if its class has a single sample in the batch).
  Samplers then act exactly as below with that positive.

Samplers (distances are Euclidean on L2-normalised embeddings, computed without gradient):

* ``random``: negative uniform over samples with a different label.
* ``semihard`` (FaceNet): negative uniform over those with d(a,p) < d(a,n) < d(a,p) + margin; fallback
  any negative.
* ``softhard`` (Roth et al. ICML'20): negative uniform among negatives closer than the farthest
  same-class sample (fallback any negative); positive uniform among same-class samples (anchor
  included, as in robrank) farther than the nearest negative, fallback any same-class sample, which
  can be the anchor itself. Softhard therefore also changes the positive.
* ``distance`` (Wu et al. 2017): negative drawn with probability ∝ 1/q(d), q the density of distances
  between random points on the unit sphere in dimension D, computed in log space, no distance cutoff
  (as robrank); same-class samples get probability 0.
* ``hardest``: nearest negative.

When a batch has no negative for an anchor, every sampler falls back to a uniform draw over the batch
(robrank does the same); such triplets carry no signal but keep shapes fixed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rdml.losses.distances import inverse_sphere_log_density, pairwise_distance_matrix

SAMPLERS = ("random", "semihard", "softhard", "distance", "hardest")
Layout = Literal["pairs", "m_per_class", "auto"]


def is_pairs_layout(labels: Tensor) -> bool:
    """True when the batch has the SPC-2 layout: even length and labels[2i] == labels[2i+1]."""
    labels = labels.view(-1)
    return labels.numel() % 2 == 0 and labels.numel() > 0 and bool((labels[0::2] == labels[1::2]).all())


def _uniform_choice(mask: Tensor, generator: torch.Generator | None) -> Tensor:
    """Per row, the column of a uniformly random True entry (rows without one: uniform over all columns)."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    empty = ~mask.any(dim=1, keepdim=True)
    usable = mask | empty
    scores = torch.where(usable, scores, torch.full_like(scores, -1.0))
    return scores.argmax(dim=1)


@torch.no_grad()
def mine_triplets(
    embeddings: Tensor,
    labels: Tensor,
    sampler: str,
    margin: float = 0.2,
    generator: torch.Generator | None = None,
    layout: Layout = "pairs",
) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(a, p, n)`` (LongTensor, on the embeddings' device) of one triplet per anchor.

    ``generator`` (a CPU ``torch.Generator``) makes the draw deterministic; without it the global
    torch RNG is used. Mining runs on CPU (a batch distance matrix is tiny).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    device = embeddings.device
    emb = embeddings.detach().float().cpu()
    y = labels.detach().view(-1).cpu()
    n = y.numel()
    if emb.shape[0] != n:
        raise ValueError(f"{emb.shape[0]} embeddings but {n} labels")
    if layout == "auto":
        layout = "pairs" if is_pairs_layout(y) else "m_per_class"
    dist = pairwise_distance_matrix(emb)
    same = y[:, None] == y[None, :]

    if layout == "pairs":
        if not is_pairs_layout(y):
            raise ValueError("pairs layout needs an even batch with labels[2i] == labels[2i+1] (SPC-2)")
        anchors = torch.arange(0, n, 2)
        positives = anchors + 1
    elif layout == "m_per_class":
        anchors = torch.arange(n)
        others = same.clone()
        others.fill_diagonal_(False)
        positives = _uniform_choice(others, generator)
        lone = ~others.any(dim=1)
        positives[lone] = anchors[lone]
    else:
        raise ValueError(f"unknown layout {layout!r}; choose pairs, m_per_class or auto")

    d = dist[anchors]  # [B, n]
    neg_mask = ~same[anchors]  # [B, n]
    pos_mask = same[anchors]
    d_ap = d.gather(1, positives[:, None])  # [B, 1]

    if sampler == "random":
        negatives = _uniform_choice(neg_mask, generator)
    elif sampler == "semihard":
        semi = neg_mask & (d_ap < d) & (d_ap - d + margin > 0)
        has = semi.any(dim=1, keepdim=True)
        negatives = _uniform_choice(torch.where(has, semi, neg_mask), generator)
    elif sampler == "softhard":
        far_pos = torch.where(pos_mask, d, torch.full_like(d, -1.0)).amax(dim=1, keepdim=True)
        soft_neg = neg_mask & (d < far_pos)
        has = soft_neg.any(dim=1, keepdim=True)
        negatives = _uniform_choice(torch.where(has, soft_neg, neg_mask), generator)
        near_neg = torch.where(neg_mask, d, torch.full_like(d, float("inf"))).amin(dim=1, keepdim=True)
        soft_pos = pos_mask & (d > near_neg)
        has_pos = soft_pos.any(dim=1, keepdim=True)
        new_pos = _uniform_choice(torch.where(has_pos, soft_pos, pos_mask), generator)
        has_neg = neg_mask.any(dim=1)
        positives = torch.where(has_neg, new_pos, positives)  # no negative at all: keep the default
    elif sampler == "distance":
        log_w = inverse_sphere_log_density(d, emb.shape[1])
        log_w = torch.where(neg_mask, log_w, torch.full_like(log_w, float("-inf")))
        has = neg_mask.any(dim=1, keepdim=True)
        log_w = torch.where(has, log_w, torch.zeros_like(log_w))  # no negative: uniform
        w = torch.exp(log_w - log_w.amax(dim=1, keepdim=True))
        negatives = torch.multinomial(w, 1, generator=generator).view(-1)
    else:  # hardest
        masked = torch.where(neg_mask, d, torch.full_like(d, float("inf")))
        negatives = masked.argmin(dim=1)
        none = ~neg_mask.any(dim=1)
        if none.any():
            negatives[none] = _uniform_choice(torch.ones_like(neg_mask[none]), generator)

    return anchors.to(device), positives.to(device), negatives.to(device)
