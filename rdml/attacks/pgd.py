"""The one PGD engine.

Every attack and every training-time adversary in rdml is an *objective* handed to :func:`pgd`. The
engine knows nothing about ranking, triplets or clustering; it only:

* takes sign (L-inf) or normalised (L2) **descent** steps on a per-sample loss that the objective
  writes so that minimising it achieves the attacker's goal (the RobRank convention);
* projects onto the eps ball around the clean input and clips to [0,1] pixel space;
* differentiates w.r.t. the input only (``torch.autograd.grad``), so no parameter ``.grad`` is left
  behind, whatever the model;
* optionally starts from a random point in the ball and runs several restarts, keeping per sample the
  restart with the lowest final loss;
* stops per sample when the objective says a sample is done (``done``), and stops the whole batch
  early when the total loss stops changing (``flat_tol``, HM's rule).

Putting the model in eval mode is the caller's job (:func:`frozen_eval`), because training-time
adversaries need to restore the model's mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Objective = Callable[[Tensor], Tensor]
"""Maps a batch of (perturbed) inputs to per-sample losses of shape [n] (to be minimised)."""

DoneFn = Callable[[Tensor, Tensor], Tensor]
"""Maps (inputs, per-sample losses) to a bool mask of samples that need no further steps."""


@dataclass(frozen=True)
class Budget:
    """A PGD budget in [0,1] pixel units."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    random_start: bool = False
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps < 0 or self.alpha < 0 or self.steps < 0 or self.restarts < 1:
            raise ValueError(f"invalid PGD budget {self}")

    @classmethod
    def from_config(cls, cfg, restarts: int = 1) -> Budget:
        """Build from a :class:`rdml.config.PGDConfig`."""
        return cls(cfg.eps, cfg.alpha, cfg.steps, cfg.norm, cfg.random_start, restarts)


@dataclass
class PGDResult:
    """The adversarial batch and what it cost."""

    x_adv: Tensor
    loss: Tensor  # per-sample final loss, shape [n]
    iterations: Tensor  # per-sample number of gradient steps taken (int64, [n])
    passes: int  # forward+backward passes the engine ran (all restarts)
    history: list[float] = field(default_factory=list)  # mean loss per step of the last restart


@contextlib.contextmanager
def frozen_eval(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration of an attack; restores both after."""
    saved = []
    for m in models:
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()]))
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, params in saved:
            m.train(training)
            for p, rg in params:
                p.requires_grad_(rg)


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(x: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x`` onto the eps ball around ``x0`` and the [0,1] box."""
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / _flat_norm(delta)).clamp(max=1.0)
        delta = delta * factor
    return (x0 + delta).clamp(0.0, 1.0)


def _random_start(x0: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        noise = torch.rand(x0.shape, generator=generator, device="cpu").to(x0) * 2 - 1
        return project(x0 + eps * noise, x0, eps, norm)
    direction = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    direction = direction / _flat_norm(direction)
    radius = torch.rand(x0.shape[0], generator=generator, device="cpu").to(x0).view(-1, *([1] * (x0.dim() - 1)))
    return project(x0 + eps * radius * direction, x0, eps, norm)


def _step(x: Tensor, grad: Tensor, alpha: float, norm: str) -> Tensor:
    if norm == "linf":
        return x - alpha * grad.sign()
    return x - alpha * grad / _flat_norm(grad)


def _run_once(
    objective: Objective,
    x0: Tensor,
    budget: Budget,
    done: DoneFn | None,
    flat_tol: float | None,
    start: Tensor,
) -> tuple[Tensor, Tensor, Tensor, int, list[float]]:
    x = start.detach().clone()
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    iterations = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    passes = 0
    history: list[float] = []
    previous = -1.0
    for _ in range(budget.steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            losses = objective(x)
            if losses.dim() == 0:
                losses = losses.expand(x0.shape[0])
            (grad,) = torch.autograd.grad(losses.sum(), x)
        passes += 1
        losses = losses.detach()
        total = float(losses.mean())
        history.append(total)
        if done is not None:
            active &= ~done(x.detach(), losses)
        if flat_tol is not None and abs(total - previous) < flat_tol:
            x = x.detach()
            break
        previous = total
        if not bool(active.any()):
            x = x.detach()
            break
        mask = active.view(-1, *([1] * (x0.dim() - 1))).to(x.dtype)
        x_new = project(_step(x.detach(), grad, budget.alpha, budget.norm), x0, budget.eps, budget.norm)
        x = x.detach() * (1 - mask) + x_new * mask
        iterations += active.long()
    with torch.no_grad():
        final = objective(x)
        if final.dim() == 0:
            final = final.expand(x0.shape[0])
    return x.detach(), final.detach(), iterations, passes, history


def pgd(
    objective: Objective,
    x0: Tensor,
    budget: Budget,
    *,
    done: DoneFn | None = None,
    flat_tol: float | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> PGDResult:
    """Run PGD on ``objective`` from the clean batch ``x0`` (values in [0,1]).

    ``objective(x)`` must return per-sample losses (shape [n]) or a scalar; the engine *descends*.
    With ``budget.eps == 0`` or ``budget.steps == 0`` the clean input is returned unchanged.
    ``start`` (a point in the ball, e.g. the previous iterate of an outer loop such as the
    dynamic-centroid clustering attack) replaces the first restart's starting point; the ball stays
    centred on ``x0``.
    """
    x0 = x0.detach()
    if budget.eps == 0 or budget.steps == 0:
        with torch.no_grad():
            loss = objective(x0)
        loss = loss.expand(x0.shape[0]) if loss.dim() == 0 else loss
        zeros = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return PGDResult(x0.clone(), loss.detach(), zeros, 0)

    best_x, best_loss, best_it, total_passes, history = None, None, None, 0, []
    for restart in range(budget.restarts):
        if restart == 0 and start is not None:
            begin = project(start.detach(), x0, budget.eps, budget.norm)
        elif budget.random_start:
            begin = _random_start(x0, budget.eps, budget.norm, generator)
        else:
            begin = x0
        x, loss, iterations, passes, history = _run_once(objective, x0, budget, done, flat_tol, begin)
        total_passes += passes
        if best_x is None:
            best_x, best_loss, best_it = x, loss, iterations
            continue
        better = loss < best_loss
        shape = (-1, *([1] * (x0.dim() - 1)))
        best_x = torch.where(better.view(shape), x, best_x)
        best_loss = torch.where(better, loss, best_loss)
        best_it = torch.where(better, iterations, best_it)
    return PGDResult(best_x, best_loss, best_it, total_passes, history)
