"""Thin base for metric losses: ``forward(embeddings, labels) -> scalar``."""

from __future__ import annotations

from torch import Tensor, nn


class MetricLoss(nn.Module):
    """A metric-learning loss. Subclasses may own parameters (proxies), see :func:`param_groups`."""

    #: True when the loss is a triplet loss with a sampler (defenses reuse ``mine``/``margin``).
    uses_triplets: bool = False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
