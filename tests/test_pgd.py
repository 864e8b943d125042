"""The one PGD engine: budget, box, input-only gradients, early stop, restarts."""

from __future__ import annotations

import torch
from torch import nn

from rdml.attacks.pgd import Budget, frozen_eval, pgd


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))


def _x(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _shift_objective(model, x0):
    """Maximise the embedding shift; the reference is offset slightly, as in ES, so the gradient at x0 is not 0."""
    ref = model(x0).detach() + 1e-3
    return lambda x: -(model(x) - ref).norm(dim=1)


def test_linf_budget_and_box_hold_and_no_param_grad():
    model, x0 = _net(), _x()
    budget = Budget(eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", random_start=True)
    with frozen_eval(model):
        res = pgd(_shift_objective(model, x0), x0, budget, generator=torch.Generator().manual_seed(0))
    assert (res.x_adv - x0).abs().max() <= 8 / 255 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after the attack
    assert res.passes == 10
    assert res.history[-1] < res.history[0]


def test_l2_budget_holds():
    model, x0 = _net(), _x()
    with frozen_eval(model):
        res = pgd(_shift_objective(model, x0), x0, Budget(eps=0.5, alpha=0.2, steps=8, norm="l2"))
    norms = (res.x_adv - x0).flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-5
    assert norms.min() > 0.1


def test_zero_budget_returns_the_clean_input():
    model, x0 = _net(), _x()
    res = pgd(_shift_objective(model, x0), x0, Budget(eps=0.0, alpha=0.1, steps=5))
    assert torch.equal(res.x_adv, x0)
    assert res.passes == 0


def test_done_samples_freeze():
    model, x0 = _net(), _x()
    done_first_half = lambda x, losses: torch.arange(len(x)) < 3  # noqa: E731
    with frozen_eval(model):
        res = pgd(_shift_objective(model, x0), x0, Budget(eps=0.1, alpha=0.01, steps=5), done=done_first_half)
    assert torch.equal(res.x_adv[:3], x0[:3])
    assert not torch.equal(res.x_adv[3:], x0[3:])
    assert res.iterations[:3].eq(0).all() and res.iterations[3:].eq(5).all()


def test_flat_objective_stops_early():
    x0 = _x()
    res = pgd(lambda x: (x * 0).flatten(1).sum(1), x0, Budget(eps=0.1, alpha=0.01, steps=20), flat_tol=1e-7)
    assert res.passes <= 2


def test_restarts_keep_the_best_sample():
    model, x0 = _net(), _x()
    obj = _shift_objective(model, x0)
    with frozen_eval(model):
        one = pgd(obj, x0, Budget(0.1, 0.02, 5, random_start=True, restarts=1), generator=torch.Generator().manual_seed(3))
        three = pgd(obj, x0, Budget(0.1, 0.02, 5, random_start=True, restarts=3), generator=torch.Generator().manual_seed(3))
    assert (three.loss <= one.loss + 1e-6).all()
    assert three.passes == 15
