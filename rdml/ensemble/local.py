"""The ensemble in one process: every member stepped in turn (tests, the bench's baseline, tune trials).

It moves records exactly as the Ray backend does (:mod:`rdml.ensemble.exchange`): at every step all
members publish first, then each steps with the others' records. Members swap their own RNG state in
for their step (:meth:`Member.rng`), so this backend and the Ray backend take identical steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rdml.config import ExperimentConfig
from rdml.ensemble.combine import EnsembleModel
from rdml.ensemble.exchange import others
from rdml.ensemble.member import Member, ensemble_steps_per_epoch, pass_length
from rdml.ensemble.parts import member_subsets
from rdml.ensemble.validate import check_ensemble


def build_members(cfg: ExperimentConfig, train_set, device: str | torch.device = "cpu",
                  transfer: type | None = None) -> list[Member]:
    """All members of the ensemble with their data subsets (seeded by ``train.seed``), after :func:`check_ensemble`."""
    check_ensemble(cfg)
    e = cfg.ensemble
    subsets = member_subsets(train_set.labels, e.members, e.parts, e.split, seed=cfg.train.seed)
    spe = ensemble_steps_per_epoch(cfg, [pass_length(cfg, train_set, s, k) for k, s in enumerate(subsets)])
    return [Member(cfg, m, train_set, subsets[m], device, steps_per_epoch=spe, transfer=transfer)
            for m in range(e.members)]


class LocalEnsemble:
    """In-process backend of :func:`rdml.ensemble.trainer.train_ensemble`."""

    name = "local"

    def __init__(self, cfg: ExperimentConfig, train_set, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.members = build_members(cfg, train_set, device)
        self.last_records: list[Any] = []
        self.timing: dict[str, float] = {"step": 0.0, "steps": 0, "bytes": 0}

    def steps_per_epoch(self) -> int:
        return self.members[0].steps_per_epoch

    def step(self, step: int) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        records = [m.publish() for m in self.members]  # everyone publishes before anyone steps
        metrics = [m.step(step, others(records, k)) for k, m in enumerate(self.members)]
        self.last_records = records
        self.timing["step"] += time.perf_counter() - t0
        self.timing["steps"] += 1
        self.timing["bytes"] += sum(r.nbytes for r in records if r is not None)
        return metrics

    def states(self) -> list[dict[str, Any]]:
        return [m.state_dict() for m in self.members]

    def load_states(self, states: list[dict[str, Any]]) -> None:
        for m, s in zip(self.members, states, strict=True):
            m.load_state_dict(s)

    def model_states(self) -> list[dict[str, torch.Tensor]]:
        return [m.model_state() for m in self.members]

    def ensemble_model(self) -> EnsembleModel:
        """The live members combined (shares their weights: training continues to change it)."""
        return EnsembleModel([m.model for m in self.members], self.cfg.ensemble.combine)

    def member_robustness(self, profiles: list[str], test_set=None, gallery=None):
        """Every member's robustness (computed now, in turn); returns ``wait() -> [rows]``."""
        from rdml.data import build_datasets
        from rdml.ensemble.summary import robustness_of
        from rdml.eval.protocol import evaluation_sets

        test, gallery = (test_set, gallery) if test_set is not None else evaluation_sets(build_datasets(self.cfg.data))
        rows = [robustness_of({"m": m.model}, test, self.cfg, profiles, device=str(m.device), gallery=gallery)["m"]
                for m in self.members]
        return lambda: rows

    def shutdown(self) -> None:
        pass
