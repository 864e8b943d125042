"""Triplet loss with an in-batch sampler (robrank ``ptripletN``: normalised metric, margin 0.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rdml.losses.base import MetricLoss
from rdml.losses.functional import triplet_loss
from rdml.losses.miners import SAMPLERS, Layout, mine_triplets


class TripletLoss(MetricLoss):
    """L = mean max(0, d(a,p) - d(a,n) + margin) over the sampler's triplets.

    ``layout="auto"`` mines SPC-2 triplets (anchors at even positions) when the batch has the pairs
    layout and treats every sample as an anchor otherwise (m-per-class batches).
    """

    uses_triplets = True

    def __init__(self, sampler: str = "random", margin: float = 0.2, layout: Layout = "auto") -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.margin = float(margin)
        self.layout = layout

    def mine(self, embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        """The sampler's ``(a, p, n)`` for this batch (no gradient)."""
        return mine_triplets(embeddings, labels, self.sampler, self.margin, generator=generator, layout=self.layout)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        emb = F.normalize(embeddings, dim=-1)
        a, p, n = self.mine(emb, labels)
        return triplet_loss(emb, a, p, n, self.margin)

    def fixed(self, clean: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> FixedTriplets:
        """Triplets mined once on the clean embeddings with ``generator``; the loss of those triplets."""
        a, p, n = self.mine(F.normalize(clean.detach(), dim=-1), labels, generator)
        return FixedTriplets(a, p, n, self.margin)

    def extra_repr(self) -> str:
        return f"sampler={self.sampler}, margin={self.margin}, layout={self.layout}"


class FixedTriplets:
    """The triplet loss of fixed triplets ``(a, p, n)``: what :meth:`TripletLoss.fixed` returns."""

    def __init__(self, a: Tensor, p: Tensor, n: Tensor, margin: float) -> None:
        self.triplets = (a, p, n)
        self.margin = float(margin)

    def __call__(self, embeddings: Tensor) -> Tensor:
        return triplet_loss(F.normalize(embeddings, dim=-1), *self.triplets, self.margin)
