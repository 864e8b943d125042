"""The ensemble in one process: every member stepped in turn (tests, the bench's baseline, M=1).

It runs exactly the step protocol of the Ray coordinator (:mod:`rdml.distributed.eat`), minus the
object store: records are passed as Python objects and the ensemble-gradient objective calls every
member's model directly (:func:`rdml.ensemble.objectives.exchanged_ensemble_objective`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rdml.attacks.pgd import frozen_eval, pgd
from rdml.config import ExperimentConfig
from rdml.ensemble.combine import EnsembleModel
from rdml.ensemble.member import Member, step_generator
from rdml.ensemble.objectives import exchanged_ensemble_objective
from rdml.ensemble.parts import member_subsets
from rdml.ensemble.stats import RobustnessStats


def build_members(cfg: ExperimentConfig, train_set, device: str | torch.device = "cpu") -> list[Member]:
    """All members of the ensemble with their data subsets (seeded by ``train.seed``)."""
    e = cfg.ensemble
    subsets = member_subsets(train_set.labels, e.members, e.parts, e.split, seed=cfg.train.seed)
    return [Member(cfg, m, train_set, subsets[m], device) for m in range(e.members)]


def ensemble_gradient_step(members: list[Member], cfg: ExperimentConfig, step: int) -> list[RobustnessStats]:
    """Reading A: every member's batch crafted against the members' mean loss, in one PGD run.

    The batches are concatenated (one chunk per member); the loss is computed per chunk, so the run
    is M independent crafts that share the engine's loop. Member k adopts chunk k. Gradients are
    rounded as the Ray exchange rounds them, so both backends take identical steps.
    """
    batches = [m.batch for m in members]
    x_cat = torch.cat([b[0] for b in batches])
    labels = [b[1] for b in batches]
    sizes = [len(b[1]) for b in batches]
    models = [mod for m in members for mod in (m.model, m.loss)]
    with frozen_eval(*models):
        result = pgd(exchanged_ensemble_objective(members, labels, sizes), x_cat, members[0].budget,
                     generator=step_generator(cfg, step))
    out, start = [], 0
    for m, n in zip(members, sizes, strict=True):
        out.append(m.set_adversarial(result.x_adv[start : start + n], result.iterations[start : start + n], step))
        start += n
    return out


class LocalEnsemble:
    """In-process backend of :func:`rdml.ensemble.trainer.train_ensemble`."""

    name = "local"

    def __init__(self, cfg: ExperimentConfig, train_set, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.members = build_members(cfg, train_set, device)
        self.last_stats: list[RobustnessStats] = []
        self.timing: dict[str, float] = {"step": 0.0, "exchange": 0.0, "steps": 0}

    def steps_per_epoch(self) -> int:
        return min(m.steps_per_epoch() for m in self.members)

    def step(self, step: int) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        for m in self.members:
            m.draw()
        mode = self.cfg.ensemble.self_transfer
        if mode == "ensemble_gradient":
            stats = ensemble_gradient_step(self.members, self.cfg, step)
        else:
            stats = [m.craft_own(step) for m in self.members]
        metrics = []
        for k, m in enumerate(self.members):
            others = [s for j, s in enumerate(stats) if j != k] if mode == "cross_member" else []
            metrics.append(m.update(others))
        self.last_stats = stats
        self.timing["step"] += time.perf_counter() - t0
        self.timing["steps"] += 1
        return metrics

    def states(self) -> list[dict[str, Any]]:
        return [m.state_dict() for m in self.members]

    def load_states(self, states: list[dict[str, Any]]) -> None:
        for m, s in zip(self.members, states, strict=True):
            m.load_state_dict(s)

    def model_states(self) -> list[dict[str, torch.Tensor]]:
        return [m.model_state() for m in self.members]

    def ensemble_model(self) -> EnsembleModel:
        return EnsembleModel([m.model for m in self.members], self.cfg.ensemble.combine)

    def member_robustness(self, profiles: list[str], test_set=None):
        """Every member's robustness (computed now, in turn); returns ``wait() -> [rows]``."""
        from rdml.data import build_datasets
        from rdml.ensemble.report import robustness_of

        test = test_set if test_set is not None else build_datasets(self.cfg.data).test
        rows = [robustness_of({"m": m.model}, test, self.cfg, profiles, device=str(m.device))["m"]
                for m in self.members]
        return lambda: rows

    def shutdown(self) -> None:
        pass
