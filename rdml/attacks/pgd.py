"""The one PGD engine.

Every attack and every training-time adversary in rdml is an *objective* handed to :func:`pgd`. The
engine knows nothing about ranking, triplets or clustering; it only:

* takes sign (L-inf) or normalised (L2) **descent** steps on a per-sample loss that the objective
  writes so that minimising it achieves the attacker's goal (the RobRank convention);
* projects onto the eps ball around the clean input and clips to [0,1] pixel space;
* differentiates w.r.t. the input only (``torch.autograd.grad``), so no parameter ``.grad`` is left
  behind, whatever the model;
* optionally starts from a random point in the ball and runs several restarts, keeping per sample the
  restart with the lowest final loss; with several restarts the first one starts at the clean input
  (the plain attack) and only the others at random points, so more restarts never make an attack
  weaker than the same attack without them;
* takes every step of size ``alpha``. A budget *written* with one step means FGSM (a single step of
  size eps, RobRank's eta = 1): attack specs and training configs translate it into ``alpha = eps``
  (:attr:`rdml.attacks.profiles.AttackSpec.budget`, :attr:`rdml.config.PGDConfig.step_size`), so
  a one-step attack never leaves most of the ball unexplored, while code that runs PGD one step at a
  time (the dynamic-centroid clustering attack) still takes steps of ``alpha``;
* stops per sample when the objective says a sample is done (``done``), and stops the whole batch
  early when the total loss stops changing (``flat_tol``, HM's rule);
* chooses its step rule from the budget (``step_rule``): ``fixed`` (the default: every step of size
  ``alpha``, all of the above) or ``apgd``, the step-size-free rule of Croce & Hein's APGD (ICML 2020,
  arXiv:2003.01690): the step starts at 2 eps, momentum 0.75, and at checkpoints (after 22% of the
  steps, then at shrinking intervals) the step of every sample whose loss stalled is halved and the
  sample restarts from the best point it has reached; the best point is returned. ``alpha`` is not used
  then. Both rules share the projection, the random starts, the restarts, ``done`` and the cost count,
  so one engine serves both (docs/methods.md#apgd-step-rule).

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

STEP_RULES = ("fixed", "apgd")
"""The engine's step rules: ``fixed`` steps of ``alpha`` (PGD) or APGD's adaptive step (:func:`_run_apgd`)."""

APGD_MOMENTUM = 0.75
"""APGD's momentum weight (Croce & Hein 2020: x <- x + 0.75 (z - x) + 0.25 (x - x_prev))."""

APGD_RHO = 0.75
"""APGD's oscillation test: halve the step when at most this fraction of the window's steps lowered the loss."""

APGD_FIRST, APGD_DECAY, APGD_MIN = 0.22, 0.03, 0.06
"""APGD's checkpoints: the first after 22% of the steps; each later window 3% of the steps shorter, never under 6%."""


@dataclass(frozen=True)
class Budget:
    """A PGD budget in [0,1] pixel units."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    random_start: bool = False
    restarts: int = 1
    step_rule: str = "fixed"  # "fixed" (steps of alpha) or "apgd" (adaptive step, momentum; alpha unused)

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.eps < 0 or self.alpha < 0 or self.steps < 0 or self.restarts < 1:
            raise ValueError(f"invalid PGD budget {self}")

    @classmethod
    def from_config(cls, cfg, restarts: int = 1) -> Budget:
        """Build from a :class:`rdml.config.PGDConfig` (``alpha: auto`` resolved there)."""
        return cls(cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.random_start, restarts)


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


def _is_random_restart(budget: Budget, restart: int) -> bool:
    """Whether restart ``restart`` begins at a random point (with several restarts the first is the clean input)."""
    return budget.random_start and not (restart == 0 and budget.restarts > 1)


def _random_starts(budget: Budget, has_start: bool) -> int:
    """How many random starting points :func:`pgd` draws (its only use of ``generator``)."""
    if budget.eps == 0:
        return 0
    if budget.steps == 0:
        return int(budget.random_start)
    return sum(_is_random_restart(budget, r) for r in range(budget.restarts) if not (r == 0 and has_start))


def skip_draws(x0: Tensor, budget: Budget, generator: torch.Generator | None, *, has_start: bool = False) -> None:
    """Advance ``generator`` exactly as ``pgd(..., x0, budget, generator=generator)`` would, without attacking.

    The draws depend only on the batch's shape and the budget, never on the model, so a worker that
    attacks batch k of a query set can start from the generator state the single-process run has there
    (:mod:`rdml.eval.shards`) by replaying the earlier batches' draws.
    """
    if generator is None:
        return
    for _ in range(_random_starts(budget, has_start)):
        _random_start(x0, budget.eps, budget.norm, generator)


def _step(x: Tensor, grad: Tensor, alpha: float | Tensor, norm: str) -> Tensor:
    """One descent step of size ``alpha`` (a number, or one per sample shaped [n, 1, ...])."""
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


def apgd_checkpoints(steps: int) -> list[int]:
    """The step indices at which APGD tests every sample's progress (Croce & Hein 2020, Sec. 3.2).

    The first window is 22% of the steps; each later one is 3% of the steps shorter than the one before,
    but at least 6% (each at least one step), as in the authors' code.
    """
    window = max(int(APGD_FIRST * steps), 1)
    decay, least = max(int(APGD_DECAY * steps), 1), max(int(APGD_MIN * steps), 1)
    out, at = [], window
    while at < steps:
        out.append(at)
        window = max(window - decay, least)
        at += window
    return out


def _run_apgd(
    objective: Objective,
    x0: Tensor,
    budget: Budget,
    done: DoneFn | None,
    start: Tensor,
) -> tuple[Tensor, Tensor, Tensor, int, list[float]]:
    """APGD's step rule on the engine's objective (descent: the loss is minimised).

    Per sample: the step size starts at 2 eps; the first step is a plain projected step, later ones add
    momentum (:data:`APGD_MOMENTUM`). At every checkpoint (:func:`apgd_checkpoints`) a sample's step is
    halved, and the sample restarts from the best point it has reached (with that point's gradient and
    no momentum), when either at most :data:`APGD_RHO` of the window's steps lowered its loss, or its
    step was not halved at the previous checkpoint and its best loss has not improved since then. The
    best point over all iterates (the start and the final iterate included) is returned, with its loss
    from a final evaluation of the objective at that point (so a caller reading what the objective saw
    last sees the returned point). ``budget.steps`` gradient evaluations are made, as with the fixed rule.
    """
    n = x0.shape[0]
    view = (-1, *([1] * (x0.dim() - 1)))
    checkpoints = set(apgd_checkpoints(budget.steps))
    x = start.detach().clone()
    x_prev = x.clone()
    eta = torch.full((n, *view[1:]), 2.0 * budget.eps, dtype=x0.dtype, device=x0.device)
    active = torch.ones(n, dtype=torch.bool, device=x0.device)
    iterations = torch.zeros(n, dtype=torch.long, device=x0.device)
    best_x = best_loss = best_grad = previous = None
    lowered = torch.zeros(n, dtype=torch.long, device=x0.device)  # steps in the window that lowered the loss
    best_at_check = reduced_at_check = None
    since_check, passes, history = 0, 0, []
    for i in range(budget.steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            losses = objective(x)
            if losses.dim() == 0:
                losses = losses.expand(n)
            (grad,) = torch.autograd.grad(losses.sum(), x)
        passes += 1
        x, losses = x.detach(), losses.detach()
        history.append(float(losses.mean()))
        if best_x is None:
            best_x, best_loss, best_grad = x.clone(), losses.clone(), grad.clone()
            best_at_check, reduced_at_check = losses.clone(), torch.ones(n, dtype=torch.bool, device=x0.device)
        else:
            better = losses < best_loss
            best_x = torch.where(better.view(view), x, best_x)
            best_grad = torch.where(better.view(view), grad, best_grad)
            best_loss = torch.where(better, losses, best_loss)
            lowered += (losses < previous).long()
            since_check += 1
        previous = losses
        if done is not None:
            active &= ~done(x, losses)
        if not bool(active.any()):
            break
        if i in checkpoints:
            stalled = lowered.double() <= APGD_RHO * since_check
            no_gain = ~reduced_at_check & (best_loss >= best_at_check)
            reduce = (stalled | no_gain) & active
            reduced_at_check, best_at_check = reduce, best_loss.clone()
            lowered.zero_()
            since_check = 0
            if bool(reduce.any()):
                r = reduce.view(view)
                eta = torch.where(r, eta / 2, eta)
                x = torch.where(r, best_x, x)
                grad = torch.where(r, best_grad, grad)
                x_prev = torch.where(r, best_x, x_prev)
                previous = torch.where(reduce, best_loss, previous)
        z = project(_step(x, grad, eta, budget.norm), x0, budget.eps, budget.norm)
        a = 1.0 if i == 0 else APGD_MOMENTUM
        x_new = project(x + a * (z - x) + (1 - a) * (x - x_prev), x0, budget.eps, budget.norm)
        mask = active.view(view)
        x_prev = torch.where(mask, x, x_prev)
        x = torch.where(mask, x_new, x)
        iterations += active.long()
    with torch.no_grad():
        final = objective(x)
        final = final.expand(n) if final.dim() == 0 else final
        better = final.detach() <= best_loss  # ties: the final iterate
        if bool(better.all()):
            return x, final.detach(), iterations, passes, history
        best_x = torch.where(better.view(view), x, best_x)
        final = objective(best_x)
        final = final.expand(n) if final.dim() == 0 else final
    return best_x.detach(), final.detach(), iterations, passes, history


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
    With ``budget.eps == 0`` the clean input is returned unchanged; with ``budget.steps == 0`` too,
    unless ``budget.random_start``: then the random starting point is returned (the noise baseline).
    ``start`` (a point in the ball, e.g. the previous iterate of an outer loop such as the
    dynamic-centroid clustering attack) replaces the first restart's starting point; the ball stays
    centred on ``x0``. ``budget.step_rule == "apgd"`` takes APGD's adaptive steps (:func:`_run_apgd`;
    ``flat_tol`` is HM's rule for the fixed step and is refused with it).
    """
    if budget.step_rule == "apgd" and flat_tol is not None:
        raise ValueError("flat_tol is the fixed step rule's batch stop (HM); APGD decides its own steps")
    x0 = x0.detach()
    if budget.eps == 0 or budget.steps == 0:
        if _random_starts(budget, start is not None):
            x0 = _random_start(x0, budget.eps, budget.norm, generator)
        with torch.no_grad():
            loss = objective(x0)
        loss = loss.expand(x0.shape[0]) if loss.dim() == 0 else loss
        zeros = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return PGDResult(x0.clone(), loss.detach(), zeros, 0)

    best_x, best_loss, best_it, total_passes, history = None, None, None, 0, []
    for restart in range(budget.restarts):
        if restart == 0 and start is not None:
            begin = project(start.detach(), x0, budget.eps, budget.norm)
        elif _is_random_restart(budget, restart):
            begin = _random_start(x0, budget.eps, budget.norm, generator)
        else:
            begin = x0
        if budget.step_rule == "apgd":
            x, loss, iterations, passes, history = _run_apgd(objective, x0, budget, done, begin)
        else:
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
