"""Hardness Manipulation, HM[src, dst] (Zhou & Patel, CVPR 2022), with the gradual adversary and ICS.

One training step:

1. Benign embeddings E (eval mode, no grad); source triplets (a, p, n) from the source sampler and
   their hardness H_S = d(a,p) - d(a,n).
2. Destination hardness H_D: a second sampler's per-triplet hardness on the same E (same anchors 2i),
   or a pseudo-hardness schedule (:mod:`rdml.defenses.schedules`; LGA by default), or g_B on top of a
   sampler.
3. Copies of X[a], X[p], X[n] (3B images, every occurrence perturbed independently, anchors too) are
   perturbed by the PGD engine minimising the ET objective J = mean_i max(0, H_D,i - H̃_S,i)^2. A
   triplet whose hinge is satisfied gets a zero gradient, so it freezes (we also mark it done, so its
   iteration count is exact); triplets that start at or above H_D are never perturbed; the batch
   stops early when |J_t - J_{t-1}| < 1e-7 (the engine's ``flat_tol``).
4. Loss L_T(φ(Ã), φ(P̃), φ(Ñ); gamma) in train mode, plus lambda * L_ICS when ``defense.ics``.
   The adversarial loss without ICS feeds the gradual adversary's l_prev, which is kept in
   :meth:`state_dict` so a resumed run continues the schedule.

Deviation from the reference code (a bug there): src == dst short-circuits only when no schedule is
set. With a schedule (e.g. HM[S, gLGA] written with dst = S) the gradual adversary still applies.
The identity case HM[X, X] is exactly regular training with sampler X (mined on the train-mode
embeddings, one pass).

The L2 (two-sided) and KL objectives are experimental: the reference author reports they do not
work, and robrank's KL is ill-posed on signed hardness; ours is KL(softmax(H_D) || softmax(H̃_S)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses import schedules
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
from rdml.defenses.ics import ics_term
from rdml.errors import ConfigError
from rdml.losses import hardness, triplet_loss

log = logging.getLogger(__name__)

FLAT_TOL = 1e-7
"""HM's early stop: the batch objective changed by less than this between two iterations."""


@dataclass
class HMResult:
    """The adversarial triplets and what they cost (exposed for tests and diagnostics)."""

    x_adv: Tensor  # [3B, C, H, W]: adversarial anchors, positives, negatives (in that order)
    iterations: Tensor  # [B] PGD steps each triplet took
    h_adv: Tensor  # [B] hardness of the adversarial triplets (eval mode)
    passes: int  # forward/backward passes PGD ran
    history: list[float]  # J per iteration


def _triplet_indices(b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    idx = torch.arange(b, device=device)
    return idx, idx + b, idx + 2 * b


def hm_objective(model: nn.Module, h_dst: Tensor, kind: str = "et"):
    """Per-image loss (length 3B) whose minimisation moves each triplet's hardness to ``h_dst``."""
    b = h_dst.shape[0]

    def objective(x: Tensor) -> Tensor:
        a, p, n = _triplet_indices(b, x.device)
        h = hardness(model(x), a, p, n)
        if kind == "et":
            per = F.relu(h_dst - h) ** 2
        elif kind == "l2":
            per = (h - h_dst) ** 2
        elif kind == "kl":
            kl = F.kl_div(F.log_softmax(h, 0), F.softmax(h_dst, 0), reduction="sum")
            return kl.expand(3 * b)
        else:
            raise ValueError(f"unknown HM objective {kind!r}")
        return per.repeat(3)

    return objective


def hm_perturb(
    model: nn.Module,
    images: Tensor,
    a: Tensor,
    p: Tensor,
    n: Tensor,
    h_dst: Tensor,
    budget: Budget,
    kind: str = "et",
    flat_tol: float | None = FLAT_TOL,
    generator: torch.Generator | None = None,
    adversary: Adversary | None = None,
) -> HMResult:
    """Perturb the 3B triplet images towards destination hardness ``h_dst`` (model frozen in eval).

    ``adversary``: a self-transfer hook (:func:`rdml.defenses.base.run_adversary`); None runs the engine.
    """
    model = plain(model)
    x0 = torch.cat([images[a], images[p], images[n]])
    b = a.shape[0]
    h_dst = h_dst.detach().to(images.device, images.dtype).expand(b).contiguous()
    with frozen_eval(model):
        done = (lambda x, losses: losses <= 0) if kind == "et" else None
        craft = Craft(hm_objective(model, h_dst, kind), x0, budget, torch.cat([a, p, n]),
                      lambda other, _loss: hm_objective(other, h_dst, kind), done=done, flat_tol=flat_tol,
                      generator=generator)
        res = run_adversary(StepState(adversary=adversary), craft)
        with torch.no_grad():
            h_adv = hardness(model(res.x_adv), *_triplet_indices(b, images.device))
    return HMResult(res.x_adv, res.iterations[:b].clone(), h_adv, res.passes, res.history)


class HardnessManipulation(Defense):
    """``defense.name=hm``: HM[source, destination or schedule], optional ICS.

    Built with keyword arguments, e.g. HM[S, gLGA] & ICS::

        HardnessManipulation(eps=77/255, alpha=3/255, steps=32, source="softhard", schedule="lga",
                             ics_weight=0.5, margin=0.2)

    * ``source``: the sampler of the source triplets (``defense.hm_src``);
    * ``destination``: the destination sampler (``defense.hm_dst``), used by the schedules ``none``
      and ``boost`` only;
    * ``schedule``: ``lga`` (default), ``g2``, ``gsqrt``, ``boost``, ``constant``, ``linear`` or ``none``
      (:mod:`rdml.defenses.schedules`), with its parameters ``u``, ``xi``, ``constant``,
      ``ramp_start``, ``ramp_end`` (``defense.hm_u`` ...);
    * ``objective``: ``et`` (the paper's), ``l2`` or ``kl`` (experimental);
    * ``ics_weight``: None for HM alone; a number lambda adds lambda * L_ICS (``defense.ics`` and
      ``defense.ics_weight``; 0.5 in the paper, 0.05 on SOP);
    * ``margin``: the triplet margin gamma (``loss.margin``).

    Statistics: ``hardness_src`` (benign source triplets), ``hardness_dst`` (H_D), ``hardness_adv``
    (after PGD), ``pgd_iters`` (mean PGD steps per triplet), ``perturbed_frac`` (triplets with at least
    one step), ``loss_adv`` (the triplet loss on adversarial triplets: the next step's l_prev),
    ``loss_ics``, ``hm_prev_loss`` (the l_prev this step used).
    """

    name = "hm"
    OBJECTIVES = ("et", "l2", "kl")

    def __init__(self, *, source: str = "softhard", destination: str | None = "semihard", schedule: str = "lga",
                 objective: str = "et", u: float = 0.2, xi: float = 0.1, constant: float = -0.1,
                 ramp_start: float = -0.2, ramp_end: float = 0.0, ics_weight: float | None = None,
                 margin: float = 0.2, loss: nn.Module | None = None, **budget) -> None:
        super().__init__(loss=loss, **budget)
        check_sampler("HardnessManipulation", "source", source)
        check_sampler("HardnessManipulation", "destination", destination, allow_none=True)
        if schedule not in schedules.SCHEDULES:
            raise ConfigError(f"HardnessManipulation: schedule={schedule!r} is unknown; choose one of "
                              f"{', '.join(schedules.SCHEDULES)}")
        if objective not in self.OBJECTIVES:
            raise ConfigError(f"HardnessManipulation: objective={objective!r} is unknown; choose et (the paper's), "
                              "l2 or kl")
        if schedule in ("none", "boost") and destination is None:
            raise ConfigError(
                f"defense.hm_schedule={schedule} needs a destination sampler: set defense.hm_dst "
                "(random/semihard/softhard/distance/hardest) or choose a pseudo-hardness schedule (e.g. lga)"
            )
        if u <= 0:
            raise ConfigError(f"HardnessManipulation: u={u!r} is the loss clip of the gradual adversary: give u > 0")
        if ics_weight is not None and ics_weight < 0:
            raise ConfigError(f"HardnessManipulation: ics_weight={ics_weight!r} must be >= 0 (None: no ICS)")
        if objective != "et":
            log.warning(
                "HM objective %r is experimental (the reference author reports l2/kl do not work); "
                "the paper's results use defense.hm_objective=et",
                objective,
            )
        self.source, self.destination_sampler, self.schedule, self.objective = source, destination, schedule, objective
        self.u, self.xi, self.constant = float(u), float(xi), float(constant)
        self.ramp_start, self.ramp_end = float(ramp_start), float(ramp_end)
        self.ics = ics_weight is not None
        self.ics_weight = float(ics_weight) if ics_weight is not None else 0.0
        self.gamma = float(margin)
        self.prev_loss = schedules.INITIAL_PREVIOUS_LOSS

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict:
        require_triplet("hm", loss_cfg)
        c = defense_cfg
        return {"source": c.hm_src, "destination": c.hm_dst, "schedule": c.hm_schedule, "objective": c.hm_objective,
                "u": c.hm_u, "xi": c.hm_xi, "constant": c.hm_constant, "ramp_start": c.hm_ramp_start,
                "ramp_end": c.hm_ramp_end, "ics_weight": c.ics_weight if c.ics else None, "margin": loss_cfg.margin}

    @property
    def identity(self) -> bool:
        """HM[X, X] without a schedule: no perturbation, exactly regular training with sampler X."""
        return self.schedule == "none" and self.source == self.destination_sampler

    def destination(self, emb: Tensor, labels: Tensor, state: StepState, b: int | None = None) -> Tensor:
        """H_D per source triplet (shape [b]) from the schedule or the destination sampler.

        The destination sampler mines on the same embeddings with the same anchors, so its i-th
        triplet's hardness is the i-th source triplet's destination.
        """
        if self.schedule in ("none", "boost"):
            a, p, n = mine(emb, labels, self.destination_sampler, self.gamma, state)
            h = hardness(emb, a, p, n)
            if self.schedule == "boost":
                h = h + schedules.boost_offset(self.prev_loss, self.xi, self.u)
            return h
        value = schedules.scalar_destination(self.schedule, self.gamma, self.prev_loss, state.progress, u=self.u,
                                             constant=self.constant, ramp_start=self.ramp_start,
                                             ramp_end=self.ramp_end)
        size = b if b is not None else labels.shape[0] // 2
        return torch.full((size,), value, device=emb.device, dtype=emb.dtype)

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        gamma = self.gamma
        if self.identity:
            # exactly what TripletLoss.forward does with sampler hm_src (one forward, mined on it)
            emb = F.normalize(model(images), dim=-1)
            a, p, n = mine(emb, labels, self.source, gamma, state)
            with torch.no_grad():
                h_src = hardness(emb.detach(), a, p, n)
            loss_adv = triplet_loss(emb, a, p, n, gamma)
            benign, anchor_adv = emb, emb[a]
            h_dst, h_adv = h_src, h_src
            iterations = torch.zeros_like(a)
            passes = 1
        else:
            clean = benign_embeddings(model, images)
            a, p, n = mine(clean, labels, self.source, gamma, state)
            b = a.shape[0]
            h_src = hardness(clean, a, p, n)
            h_dst = self.destination(clean, labels, state, b)
            res = hm_perturb(model, images, a, p, n, h_dst, self.budget, self.objective, generator=state.generator,
                             adversary=state.adversary)
            if self.ics:  # one forward through the (possibly DDP) model: adversarial triplets + benign batch
                emb_all = model(torch.cat([res.x_adv, images]))
                emb_adv, benign = emb_all[: 3 * b], emb_all[3 * b :]
            else:
                emb_adv, benign = model(res.x_adv), None
            loss_adv = triplet_loss(emb_adv, *_triplet_indices(b, images.device), gamma)
            anchor_adv, h_adv, iterations = emb_adv[:b], res.h_adv, res.iterations
            passes = res.passes + 1 + int(self.ics)  # ICS's benign forward/backward counted as one more pass
        loss = loss_adv
        stats: dict[str, float] = {}
        if self.ics:
            loss_ics = ics_term(benign[a], anchor_adv, benign[p])
            loss = loss_adv + self.ics_weight * loss_ics
            stats["loss_ics"] = float(loss_ics.detach())
        l_adv = float(loss_adv.detach())
        stats.update(
            loss=float(loss.detach()),
            loss_adv=l_adv,
            pgd_iters=float(iterations.float().mean()),
            perturbed_frac=float((iterations > 0).float().mean()),
            hardness_src=float(h_src.mean()),
            hardness_dst=float(h_dst.float().mean()),
            hardness_adv=float(h_adv.mean()),
            hm_prev_loss=self.prev_loss,
        )
        self.prev_loss = l_adv
        return DefenseOutput(loss, stats, passes)

    def state_dict(self) -> dict[str, Any]:
        return {"prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_loss = float(state.get("prev_loss", schedules.INITIAL_PREVIOUS_LOSS))
