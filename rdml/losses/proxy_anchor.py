"""Proxy-Anchor loss (Kim et al. CVPR 2020) via pytorch-metric-learning's ``ProxyAnchorLoss``.

L = 1/|P+| Σ_{p∈P+} log(1 + Σ_{x∈X_p+} exp(-α(s(x,p) - δ)))
  + 1/|P|  Σ_{p∈P}  log(1 + Σ_{x∈X_p-} exp( α(s(x,p) + δ)))

with s the cosine similarity, P+ the proxies with a positive in the batch. PML's implementation
matches the official code on the divisors: the positive term is divided by the number of proxies
that have a positive in the batch, the negative term by the number of classes (checked in PML 2.9's
``proxy_anchor_loss.py``: ``divisor=len(with_pos_proxies)`` and ``divisor=self.num_classes``).
Proxies are initialised with kaiming-normal (fan_out) as in the official code, and usually get a
larger learning rate (``loss.proxy_lr_multiplier``, see :func:`rdml.losses.param_groups`).
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from rdml.losses.base import MetricLoss


class ProxyAnchorLoss(MetricLoss):
    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self._loss = pml_losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=margin, alpha=alpha)

    @property
    def proxies(self) -> nn.Parameter:
        return self._loss.proxies

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._loss(embeddings, labels.view(-1).long())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, alpha={self.alpha}"
