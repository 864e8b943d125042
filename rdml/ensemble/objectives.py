"""PGD objectives of EAT's adversaries and the per-sample statistics a member publishes.

All adversaries go through the one PGD engine (:func:`rdml.attacks.pgd.pgd`); this module only
writes the objectives (per-sample losses that PGD *minimises*, so each is minus a training loss).

* :func:`chunk_losses`: member j's metric loss on a concatenation of several batches (one chunk per
  member's batch). The loss is batch-coupled (mined triplets, proxies), so it is computed per chunk
  and spread evenly over the chunk's samples; the sum over samples is the sum of the chunk losses and
  the input gradient of chunk k is exactly grad L_j(chunk k).
* :func:`ensemble_objective`: reading A (``ensemble_gradient``) in one process: minus the mean over
  members of their chunk losses. Its input gradient is the mean of the members' input gradients.
* :class:`ExchangedObjective`: the same objective when every member lives in its own process: the
  member computes its own loss and input gradient, exchanges them (``gather``), and the returned
  tensor's backward yields the mean of all members' gradients. The PGD engine cannot tell the two
  apart, so the distributed and in-process ensembles run the same PGD code.
* :func:`per_sample_stats`: loss-agnostic per-sample robustness statistics (batch-hard triplet
  hinge, hardness, embedding shift).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rdml.losses import hardness as triplet_hardness


def chunk_losses(model, loss_fn, x: Tensor, labels: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """Per-sample spread of the batch loss of each chunk: entry i of chunk k is L(chunk k) / |chunk k|."""
    emb = model(x)
    out = []
    start = 0
    for y, n in zip(labels, sizes, strict=True):
        value = loss_fn(emb[start : start + n], y)
        out.append((value / n).expand(n))
        start += n
    return torch.cat(out)


def ensemble_objective(
    members: Sequence, labels: Sequence[Tensor], sizes: Sequence[int]
) -> Callable[[Tensor], Tensor]:
    """Reading A in one process: minimise minus the members' mean loss (members' RNGs kept apart)."""

    def objective(x: Tensor) -> Tensor:
        total = None
        for m in members:
            with m.rng():
                value = chunk_losses(m.model, m.loss, x, labels, sizes)
            total = value if total is None else total + value
        return -total / len(members)

    return objective


def exchange_round(t: Tensor | None, members: int) -> Tensor | None:
    """What a value looks like after the Ray exchange: float16 when members > 1 (exact for M = 1)."""
    if t is None or members == 1:
        return t
    return t.detach().to(torch.float16).to(t.dtype)


def exchanged_ensemble_objective(
    members: Sequence, labels: Sequence[Tensor], sizes: Sequence[int]
) -> Callable[[Tensor], Tensor]:
    """Reading A in one process, computed exactly as the Ray members compute it.

    Every member's loss and input gradient go through :func:`exchange_round` (the float16 records of
    :mod:`rdml.distributed.eat`) before averaging, so the in-process ensemble and the Ray ensemble take
    bit-identical PGD steps. Without the rounding (M = 1) it is :func:`ensemble_objective`.
    """
    m_count = len(members)

    def objective(x: Tensor) -> Tensor:
        losses, grads = [], []
        for m in members:
            with m.rng():
                if x.requires_grad:
                    with torch.enable_grad():
                        own = -chunk_losses(m.model, m.loss, x, labels, sizes)
                        (g,) = torch.autograd.grad(own.sum(), x)
                    grads.append(exchange_round(g, m_count))
                else:
                    with torch.no_grad():
                        own = -chunk_losses(m.model, m.loss, x, labels, sizes)
            losses.append(exchange_round(own.detach(), m_count))
        mean_loss = torch.stack(losses).mean(0)
        if not x.requires_grad:
            return mean_loss
        return _MeanGradient.apply(x, mean_loss, torch.stack(grads).mean(0))

    return objective


class _MeanGradient(torch.autograd.Function):
    """Identity on the (exchanged) mean loss whose input gradient is the exchanged mean gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, mean_loss: Tensor, mean_grad: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(mean_grad)
        return mean_loss.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (mean_grad,) = ctx.saved_tensors
        shape = (-1, *([1] * (mean_grad.dim() - 1)))
        return grad_out.view(shape) * mean_grad, None, None


Gather = Callable[[Tensor, "Tensor | None"], list[tuple[Tensor, "Tensor | None"]]]
"""(own per-sample losses, own input gradient or None) -> every member's (losses, gradient), in member order.
The gradient is None in the engine's final no-grad loss evaluation (only losses are exchanged)."""


class ExchangedObjective:
    """Reading A across processes: own loss + gradient, exchanged, averaged (see module doc).

    ``own(x)`` returns this member's per-sample objective (minus its chunk losses) with grad;
    ``gather`` performs the exchange (through the Ray object store in :mod:`rdml.distributed.eat`).
    ``exchanges`` counts the exchanges (one per PGD iteration, plus the final loss evaluation).
    """

    def __init__(self, own: Callable[[Tensor], Tensor], gather: Gather) -> None:
        self.own = own
        self.gather = gather
        self.exchanges = 0

    def __call__(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # the engine's final no-grad evaluation: exchange the losses only
            with torch.no_grad():
                losses = self.own(x)
            contributions = self.gather(losses, None)
            self.exchanges += 1
            return torch.stack([c[0].to(losses) for c in contributions]).mean(0)
        with torch.enable_grad():
            losses = self.own(x)
            (grad,) = torch.autograd.grad(losses.sum(), x, retain_graph=False)
        contributions = self.gather(losses.detach(), grad.detach())
        self.exchanges += 1
        mean_loss = torch.stack([c[0].to(losses) for c in contributions]).mean(0)
        mean_grad = torch.stack([c[1].to(grad) for c in contributions]).mean(0)
        return _MeanGradient.apply(x, mean_loss, mean_grad)


def _batch_hard(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every sample as anchor, its farthest positive and nearest negative (itself if none)."""
    d = torch.cdist(emb, emb)
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_d = d.masked_fill(~same | eye, -1.0)
    neg_d = d.masked_fill(same, float("inf"))
    a = torch.arange(len(labels), device=emb.device)
    p = torch.where(pos_d.max(1).values >= 0, pos_d.argmax(1), a)
    n = torch.where(torch.isfinite(neg_d.min(1).values), neg_d.argmin(1), a)
    return a, p, n


@torch.no_grad()
def per_sample_stats(emb_adv: Tensor, emb_clean: Tensor, labels: Tensor, margin: float) -> dict[str, Tensor]:
    """Per-sample adversarial loss (batch-hard hinge), hardness d(a,p)-d(a,n), embedding shift."""
    a, p, n = _batch_hard(emb_adv, labels)
    hard = triplet_hardness(emb_adv, a, p, n)
    return {
        "adv_loss": torch.relu(hard + margin),
        "hardness": hard,
        "shift": (emb_adv - emb_clean).norm(dim=1),
    }
