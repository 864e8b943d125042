"""Optimiser and learning-rate schedule from the config.

The metric loss may have parameters of its own (proxy-anchor's proxies); they get their own param
group with ``lr * loss.proxy_lr_multiplier``, as proxy methods need (proxies move much faster than
the backbone).
"""

from __future__ import annotations

import torch
from torch import nn

from rdml.config import ExperimentConfig


def build_optimizer(cfg: ExperimentConfig, model: nn.Module, loss: nn.Module | None = None) -> torch.optim.Optimizer:
    """Adam / AdamW over the model, plus a faster group for the loss's own parameters (if any)."""
    from rdml.losses import param_groups

    tc = cfg.train
    groups = param_groups(model, loss if loss is not None else nn.Module(), tc.lr, cfg.loss.proxy_lr_multiplier)
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch LR schedule (stepped once at the end of each epoch), or None.

    ``cosine`` anneals to 0 over ``train.epochs``; ``step`` multiplies by ``lr_gamma`` every
    ``lr_step_epochs`` epochs.
    """
    tc = cfg.train
    if tc.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(tc.epochs, 1))
    if tc.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc.lr_step_epochs, gamma=tc.lr_gamma)
    return None


def rescale_lr(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiply every group's learning rate (and the schedule's base) by ``factor``.

    Used when a run is resumed with a different ``train.lr`` (e.g. a lower one after divergence):
    the optimiser state is restored from the checkpoint, then the new lr takes effect.
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
