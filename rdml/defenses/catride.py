"""CA-TRIDE, Collapse-Aware TRIplet DEcoupling (Tian et al., ICML 2024, arXiv 2312.07364).

Written from the public code (michaeltian108/CA-TRIDE, ``defenses/pnp.py``); the paper's text was not
available, so where the two may differ is listed in docs/methods.md#ca-tride. One step:

1. **Mining** on the benign embeddings: anchor and positive are an SPC-2 pair, the negative semi-hard
   with a margin that shrinks over training, m(t) = margin * (1 - t/2)^2 (t = training progress in
   [0, 1]: m goes from 0.2 to 0.05).
2. **Triplet decoupling**: steps alternate between perturbing the *candidates* (positive and negative,
   anchor clean) and perturbing the *anchor* (positive and negative clean); no step perturbs both.
   rdml alternates on the global step's parity, so a resumed run keeps the phase.
3. **Collapse awareness**: each side of a batch's triplets is summarised by a soft maximum of its
   distances, D~(d) = sum_i softmax(lambda * d)_i d_i; collapseness is D~_ap - D~_an (the batch is at the
   edge of collapse at 0). PGD (the configured budget, no random start) *minimises*

   * candidates: relu(D~_an - D~_ap): push positives away from and negatives towards the clean anchor
     until the batch reaches the collapse edge, then stop (the loss is 0);
   * anchor: relu(D~_ap - D~_an) + g * relu(S - d_aa), with S the mean distance of the anchor to its
     closest half of negatives, d_aa the mean shift of the anchors from their clean embeddings and
     g = exp(-relu(D~_an - D~_ap)) a constant per iteration: pull anchors towards their nearest
     negatives until they moved that far, with a guard that pushes back once the ordering inverts.

   The step size ramps with training progress (alpha * t; the code ramps per epoch, so its first epoch
   trains on clean images); a batch whose loss is below 1e-5 stops.
4. **Loss** in train mode, one forward: the triplet loss (margin ``margin``) on the step's triplets, the
   perturbed side adversarial, plus ``extra_weight`` * relu(P - Q + ``extra_margin``), P and Q the means
   of the smallest half of d(a, p) and of d(a, n).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.base import (
    Craft,
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    mine,
    plain,
    require_triplet,
    run_adversary,
)
from rdml.errors import ConfigError
from rdml.losses import triplet_loss

STOP_LOSS = 1e-5
"""A batch whose perturbation loss is below this has reached its goal: PGD stops (the code's rule)."""


def soft_max_distance(d: Tensor, lam: float) -> Tensor:
    """sum_i softmax(lam * d)_i d_i: the mean for lam -> 0, the largest distance for lam -> infinity."""
    return (torch.softmax(lam * d, dim=0) * d).sum()


def collapseness(d_ap: Tensor, d_an: Tensor, lam: float) -> Tensor:
    """D~_ap - D~_an: below 0 the batch's triplets are ordered (positives closer), 0 is the collapse edge."""
    return soft_max_distance(d_ap, lam) - soft_max_distance(d_an, lam)


def _smallest_half_mean(d: Tensor) -> Tensor:
    k = max(1, d.numel() // 2)
    return d.topk(k, largest=False).values.mean()


def candidate_objective(model: nn.Module, anchor: Tensor, b: int, lam: float):
    """Rows [P; N] perturbed against the clean anchor embeddings: relu(D~_an - D~_ap), one value per row."""

    def objective(x: Tensor) -> Tensor:
        emb = model(x)
        d_ap = F.pairwise_distance(anchor, emb[:b])
        d_an = F.pairwise_distance(anchor, emb[b:])
        return F.relu(-collapseness(d_ap, d_an, lam)).expand(2 * b)

    return objective


def anchor_objective(model: nn.Module, clean_anchor: Tensor, positive: Tensor, negative: Tensor, lam: float):
    """Rows A perturbed against clean positives and negatives: relu(D~_ap - D~_an) + g relu(S - d_aa)."""

    def objective(x: Tensor) -> Tensor:
        emb = model(x)
        d_ap = F.pairwise_distance(emb, positive)
        d_an = F.pairwise_distance(emb, negative)
        c = collapseness(d_ap, d_an, lam)
        g = math.exp(-max(0.0, -float(c.detach())))  # 1 at or past the collapse edge, small when well ordered
        shift = F.pairwise_distance(emb, clean_anchor).mean()
        loss = F.relu(c) + g * F.relu(_smallest_half_mean(d_an) - shift)
        return loss.expand(x.shape[0])

    return objective


def _stop(_x: Tensor, losses: Tensor) -> Tensor:
    return losses < STOP_LOSS


class CollapseAwareTripletDecoupling(Defense):
    """``defense.name=catride``: CA-TRIDE.

    ``CollapseAwareTripletDecoupling(eps=..., alpha=..., steps=..., lam=10.0, margin=0.2, extra_weight=0.5,
    extra_margin=0.04, warmup=True)``. ``lam`` is the soft-max temperature lambda of collapseness (the
    code's values: CUB 10, Cars 9.5, SOP 2; none is given for 28x28 data); ``warmup`` ramps the PGD step
    with training progress. From a config: ``defense.catride_lambda``, ``defense.catride_warmup``,
    ``loss.margin`` (``loss.name`` must be triplet).
    """

    name = "catride"

    def __init__(self, *, lam: float = 10.0, margin: float = 0.2, extra_weight: float = 0.5,
                 extra_margin: float = 0.04, warmup: bool = True, loss: nn.Module | None = None, **budget) -> None:
        super().__init__(loss=loss, **budget)
        if not lam > 0:
            raise ConfigError(f"CollapseAwareTripletDecoupling: lam={lam!r} is collapseness' soft-max temperature; "
                              "give lam > 0 (the code uses 10 for CUB, 9.5 for Cars, 2 for SOP)")
        if extra_weight < 0:
            raise ConfigError(f"CollapseAwareTripletDecoupling: extra_weight={extra_weight!r} must be >= 0")
        self.lam, self.margin = float(lam), float(margin)
        self.extra_weight, self.extra_margin, self.warmup = float(extra_weight), float(extra_margin), bool(warmup)

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict:
        require_triplet("catride", loss_cfg)
        return {"lam": defense_cfg.catride_lambda, "warmup": defense_cfg.catride_warmup, "margin": loss_cfg.margin}

    def _budget(self, progress: float) -> Budget | None:
        """This step's budget: alpha ramped with progress (None: a zero step, nothing to perturb)."""
        if not self.warmup:
            return self.budget
        scale = min(max(progress, 0.0), 1.0)
        if scale == 0.0:
            return None
        return dataclasses.replace(self.budget, alpha=self.budget.alpha * scale)

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        clean = benign_embeddings(model, images)
        mining_margin = self.margin * (1.0 - min(max(state.progress, 0.0), 1.0) / 2.0) ** 2
        a, p, n = mine(clean, labels, "semihard", mining_margin, state)
        b = a.shape[0]
        anchor_phase = state.step % 2 == 1  # even steps: the candidates (the code starts with them)
        rows = a if anchor_phase else torch.cat([p, n])
        x0 = images[rows]
        budget = self._budget(state.progress)
        inner = plain(model)
        if anchor_phase:
            objective = anchor_objective(inner, clean[a], clean[p], clean[n], self.lam)
            rebuild = lambda other, _loss: anchor_objective(  # noqa: E731
                other, benign_embeddings(other, images[a]), benign_embeddings(other, images[p]),
                benign_embeddings(other, images[n]), self.lam)
        else:
            objective = candidate_objective(inner, clean[a], b, self.lam)
            rebuild = lambda other, _loss: candidate_objective(  # noqa: E731
                other, benign_embeddings(other, images[a]), b, self.lam)
        with frozen_eval(inner):
            with torch.no_grad():
                before = float(objective(x0)[0])
            if budget is None:
                x_adv, iterations, passes, after = x0, torch.zeros(len(x0), dtype=torch.long), 0, before
            else:
                res = run_adversary(state, Craft(objective, x0, budget, rows, rebuild, done=_stop,
                                                 generator=state.generator))
                x_adv, iterations, passes, after = res.x_adv, res.iterations, res.passes, float(res.loss[0])
        if anchor_phase:
            batch = torch.cat([x_adv, images[p], images[n]])
        else:
            batch = torch.cat([images[a], x_adv])
        emb = model(batch)
        idx = torch.arange(b, device=images.device)
        d_ap = F.pairwise_distance(emb[idx], emb[idx + b])
        d_an = F.pairwise_distance(emb[idx], emb[idx + 2 * b])
        triplet = triplet_loss(emb, idx, idx + b, idx + 2 * b, self.margin)
        extra = F.relu(_smallest_half_mean(d_ap) - _smallest_half_mean(d_an) + self.extra_margin)
        loss = triplet + self.extra_weight * extra
        with torch.no_grad():
            c_adv = float(collapseness(d_ap.detach(), d_an.detach(), self.lam))
            clean_ap, clean_an = F.pairwise_distance(clean[a], clean[p]), F.pairwise_distance(clean[a], clean[n])
            c_clean = float(collapseness(clean_ap, clean_an, self.lam))
        stats = {
            "loss": float(loss.detach()),
            "loss_adv": float(triplet.detach()),
            "loss_extra": float(extra.detach()),
            "pgd_iters": float(iterations.float().mean()),
            "perturbed_frac": float((iterations > 0).float().mean()),
            "hardness_src": float((clean_ap - clean_an).mean()),  # losses.hardness on the clean triplets
            "hardness_adv": float((d_ap - d_an).detach().mean()),
            "catride_anchor_phase": float(anchor_phase),
            "catride_collapseness_clean": c_clean,
            "catride_collapseness_adv": c_adv,
            "catride_objective_before": before,
            "catride_objective_after": after,
        }
        return DefenseOutput(loss, stats, passes=passes + 1)
