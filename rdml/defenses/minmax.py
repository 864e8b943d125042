"""Plain min-max adversarial training of the metric loss (Madry et al.'s PGD-AT): what EAT's members run.

One step:

1. Benign embeddings of the batch (eval mode, no grad). The metric loss fixes its batch coupling on
   them once (:meth:`rdml.losses.MetricLoss.fixed`): the triplet loss mines its triplets here, with
   the step's generator, and keeps them; proxy-anchor and contrastive losses draw nothing.
2. The PGD engine maximises that fixed loss over the eps ball (it descends ``-L / n`` spread over the
   batch, so the input gradient is exactly ``-grad L``): every iteration targets the *same* triplets,
   where a loss that re-mines at every call would chase a different objective at every sign step.
   The budget's ``random_start`` starts from a uniform point of the ball.
3. The update: ``(1 - lambda) L(f(x_adv)) + lambda L(f(x))`` with the same fixed triplets, in train
   mode; ``lambda`` = ``defense.minmax_clean_weight`` (0: pure min-max; the clean term goes through
   the same forward, so it is one pass).

This adversary has no anti-collapse term: at a large eps, min-max on a metric loss can shrink the
embedding into a small cap, where the loss sits at its margin whatever the perturbation (the collapse
the ACT and HM papers describe). ``embedding_spread`` (RMS pairwise distance of the clean batch
embeddings, about 1.4 for a well-spread unit embedding) is logged every step so that it shows in
training; the robustness evaluation flags it (:data:`rdml.attacks.ers.COLLAPSE_SPREAD`).

Self-transfer (EAT): the inner maximisation goes through :func:`rdml.defenses.base.run_adversary`;
``objective_for`` builds the same objective for another member (its own model, loss, clean mining),
so ``ensemble_gradient`` can craft against the members' mean loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.base import (
    Craft,
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    plain,
    run_adversary,
)
from rdml.errors import ConfigError
from rdml.losses.base import FixedLoss


def batch_spread(emb: Tensor) -> float:
    """RMS pairwise distance of the batch embeddings, ``sqrt(2 mean||e||^2 - 2 ||mean e||^2)`` (in torch, float64:
    bit-reproducible across processes, which numpy's alignment-dependent summation is not)."""
    e = emb.detach().double()
    centre = e.mean(0)
    return float(torch.sqrt(torch.clamp(2.0 * (e * e).sum(1).mean() - 2.0 * (centre @ centre), min=0.0)))


def loss_objective(model: nn.Module, fixed: FixedLoss, n: int):
    """``-L(f(x)) / n`` per sample (PGD descends it: the sum's gradient is ``-grad L``)."""

    def objective(x: Tensor) -> Tensor:
        return (-fixed(model(x)) / n).expand(n)

    return objective


class MinMax(Defense):
    """``defense.name=minmax``: PGD maximising the member's metric loss (fixed per step), then train on it.

    ``MinMax(eps=77/255, alpha="auto", steps=8, random_start=True, clean_weight=0.0,
    loss=TripletLoss(sampler="random", margin=0.2))``; any metric loss (triplet, proxy-anchor,
    contrastive). From a config: ``defense.minmax_clean_weight``.
    """

    name = "minmax"

    def __init__(self, *, clean_weight: float = 0.0, loss: nn.Module | None = None, **budget) -> None:
        super().__init__(loss=loss, **budget)
        if not 0.0 <= clean_weight <= 1.0:
            raise ConfigError(f"MinMax: clean_weight={clean_weight!r} is a mixing weight: give a value in [0, 1]")
        self.clean_weight = float(clean_weight)

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict:
        return {"clean_weight": defense_cfg.minmax_clean_weight}

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        loss_fn = self._needs_loss()
        net = plain(model)
        n = images.shape[0]
        clean = benign_embeddings(net, images)
        fixed = loss_fn.fixed(clean, labels, state.generator)

        def objective_for(other: nn.Module, other_loss: nn.Module | None):
            mined = (other_loss or loss_fn).fixed(benign_embeddings(other, images), labels, state.generator)
            return loss_objective(other, mined, n)

        craft = Craft(loss_objective(net, fixed, n), images, self.budget, torch.arange(n, device=images.device),
                      objective_for, generator=state.generator)
        with frozen_eval(net, loss_fn):
            res = run_adversary(state, craft)
        w = self.clean_weight
        stats: dict[str, float] = {}
        if w > 0:  # one forward for both terms (DDP: one forward per step)
            emb = model(torch.cat([res.x_adv, images]))
            loss_adv, loss_clean = fixed(emb[:n]), fixed(emb[n:])
            loss = (1.0 - w) * loss_adv + w * loss_clean
            stats["loss_clean"] = float(loss_clean.detach())
        else:
            loss_adv = fixed(model(res.x_adv))
            loss = loss_adv
        stats.update(
            loss=float(loss.detach()),
            loss_adv=float(loss_adv.detach()),
            pgd_iters=float(res.iterations.float().mean()),
            perturbed_frac=float((res.iterations > 0).float().mean()),
            embedding_spread=batch_spread(clean),
        )
        return DefenseOutput(loss, stats, passes=res.passes + 1)
