"""Contrastive loss over all pairs of the batch (pytorch-metric-learning's ``ContrastiveLoss``).

Positive pairs: max(0, d - pos_margin); negative pairs: max(0, neg_margin - d), with d the Euclidean
distance of L2-normalised embeddings. Each of the two terms is averaged over its pairs with a
non-zero loss (PML's default ``AvgNonZeroReducer``) and the two averages are summed.
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from rdml.losses.base import MetricLoss


class ContrastiveLoss(MetricLoss):
    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self._loss = pml_losses.ContrastiveLoss(pos_margin=self.pos_margin, neg_margin=self.neg_margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._loss(embeddings, labels.view(-1))

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"
