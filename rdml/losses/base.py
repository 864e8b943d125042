"""Thin base for metric losses: ``forward(embeddings, labels) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

FixedLoss = Callable[[Tensor], Tensor]
"""embeddings of the (perturbed) batch -> the loss, its batch coupling (mined triplets) fixed in advance."""


class MetricLoss(nn.Module):
    """A metric-learning loss. Subclasses may own parameters (proxies), see :func:`param_groups`."""

    #: True when the loss is a triplet loss with a sampler (defenses reuse ``mine``/``margin``).
    uses_triplets: bool = False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fixed(self, clean: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> FixedLoss:
        """The loss on this batch as a function of its embeddings, with whatever it draws drawn *once* now.

        An adversary that maximises the loss over several PGD iterations needs one objective: a loss
        that re-mines at every call (:class:`rdml.losses.TripletLoss`) would target different triplets
        at every step. ``clean`` are the batch's benign embeddings (mining happens on them), ``generator``
        seeds the draw. Losses without random mining (proxy-anchor, contrastive) are fixed already.
        """
        return lambda embeddings: self(embeddings, labels)
