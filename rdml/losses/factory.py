"""Build the configured loss, and the optimiser parameter groups that give proxies their own lr."""

from __future__ import annotations

from torch import nn

from rdml.errors import ConfigError
from rdml.losses.base import MetricLoss
from rdml.losses.contrastive import ContrastiveLoss
from rdml.losses.proxy_anchor import ProxyAnchorLoss
from rdml.losses.triplet import TripletLoss

LOSSES = ("triplet", "contrastive", "proxy_anchor")
"""The losses :func:`build_loss` builds (the config's allowed ``loss.name`` values)."""


def build_loss(cfg, num_classes: int, embedding_dim: int) -> MetricLoss:
    """The loss named by ``cfg.name`` (a :class:`rdml.config.LossConfig`)."""
    if cfg.name == "triplet":
        return TripletLoss(sampler=cfg.sampler, margin=cfg.margin)
    if cfg.name == "contrastive":
        return ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin)
    if cfg.name == "proxy_anchor":
        if num_classes < 1:
            raise ConfigError("loss.name=proxy_anchor needs the number of training classes (got 0)")
        return ProxyAnchorLoss(num_classes, embedding_dim, margin=cfg.proxy_margin, alpha=cfg.proxy_alpha)
    raise ConfigError(f"loss.name={cfg.name!r} is not supported; choose triplet, contrastive or proxy_anchor")


def param_groups(model: nn.Module, loss: nn.Module, lr: float, proxy_lr_multiplier: float = 1.0) -> list[dict]:
    """Optimiser groups: the model at ``lr``; the loss's own parameters (proxies) at ``lr * multiplier``."""
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "name": "model"}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": lr * proxy_lr_multiplier, "name": "loss"})
    return groups
