"""ACT, Anti-Collapse Triplet (Zhou et al., "Adversarial Attack and Defense in Deep Ranking").

Triplets are mined on the benign embeddings with the loss's sampler (``loss.sampler``: random gives
ACT[R], softhard ACT[S]). Only the positives and negatives are perturbed, to *collapse* them onto each
other (PGD minimises d(φ(P̃), φ(Ñ)) per pair); the anchor is untouched, which avoids misleading
gradients. The loss is L_T(φ(A), φ(P̃), φ(Ñ); gamma) with the benign anchor embedding carrying gradient.
No early stop: ACT costs eta + 1 passes. (robrank passes margin 1.0 to the semihard sampler inside ACT;
we pass the loss margin, which only matters for ACT[M].)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.base import (
    Adversary,
    Craft,
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    check_sampler,
    mine,
    plain,
    require_triplet,
    run_adversary,
)
from rdml.losses import hardness, triplet_loss


@dataclass
class ACTResult:
    x_adv: Tensor  # [2B, C, H, W]: adversarial positives then negatives
    iterations: Tensor  # [B]
    distance_before: Tensor  # [B] d(φ(P), φ(N))
    distance_after: Tensor  # [B] d(φ(P̃), φ(Ñ))
    passes: int


def act_objective(model: nn.Module, b: int):
    """d(φ(P̃), φ(Ñ)) per pair, repeated for both rows of the pair (the rows are [P; N])."""

    def objective(x: Tensor) -> Tensor:
        emb = model(x)
        d = F.pairwise_distance(emb[:b], emb[b:])
        return d.repeat(2)

    return objective


def act_perturb(
    model: nn.Module, images: Tensor, p: Tensor, n: Tensor, budget: Budget, generator: torch.Generator | None = None,
    adversary: Adversary | None = None,
) -> ACTResult:
    """Collapse each (positive, negative) pair; the model is frozen in eval mode meanwhile.

    ``adversary``: a self-transfer hook (:func:`rdml.defenses.base.run_adversary`); None runs the engine.
    """
    model = plain(model)
    b = p.shape[0]
    x0 = torch.cat([images[p], images[n]])
    objective = act_objective(model, b)
    craft = Craft(objective, x0, budget, torch.cat([p, n]), lambda other, _loss: act_objective(other, b),
                  generator=generator)
    with frozen_eval(model):
        with torch.no_grad():
            before = objective(x0)[:b]
        res = run_adversary(StepState(adversary=adversary), craft)
    return ACTResult(res.x_adv, res.iterations[:b].clone(), before, res.loss[:b], res.passes)


class AntiCollapseTriplet(Defense):
    """``defense.name=act``: ACT[sampler].

    ``AntiCollapseTriplet(eps=..., alpha=..., steps=..., sampler="random", margin=0.2)``: triplets mined
    with ``sampler`` on the benign embeddings, the triplet loss with margin gamma = ``margin``. From a
    config: ``loss.sampler`` and ``loss.margin`` (``loss.name`` must be triplet).
    """

    name = "act"

    def __init__(self, *, sampler: str = "random", margin: float = 0.2, loss: nn.Module | None = None,
                 **budget) -> None:
        super().__init__(loss=loss, **budget)
        check_sampler("AntiCollapseTriplet", "sampler", sampler)
        self.sampler = sampler
        self.margin = float(margin)

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict:
        require_triplet("act", loss_cfg)
        return {"sampler": loss_cfg.sampler, "margin": loss_cfg.margin}

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        gamma = self.margin
        clean = benign_embeddings(model, images)
        a, p, n = mine(clean, labels, self.sampler, gamma, state)
        res = act_perturb(model, images, p, n, self.budget, state.generator, state.adversary)
        b = a.shape[0]
        emb = model(torch.cat([images[a], res.x_adv]))
        idx = torch.arange(b, device=images.device)
        loss = triplet_loss(emb, idx, idx + b, idx + 2 * b, gamma)
        with torch.no_grad():
            h_adv = hardness(emb.detach(), idx, idx + b, idx + 2 * b)
        value = float(loss.detach())
        stats = {
            "loss": value,
            "loss_adv": value,
            "pgd_iters": float(res.iterations.float().mean()),
            "perturbed_frac": float((res.iterations > 0).float().mean()),
            "hardness_src": float(hardness(clean, a, p, n).mean()),
            "hardness_adv": float(h_adv.mean()),
            "act_pn_distance_before": float(res.distance_before.mean()),
            "act_pn_distance_after": float(res.distance_after.mean()),
        }
        return DefenseOutput(loss, stats, passes=res.passes + 1)
