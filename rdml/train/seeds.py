"""Several seeds of one experiment (``rdml train --seeds N``): the configs, the loop, the summary.

One seed's numbers are not evidence: two runs of the same recipe differ by more than many of the gaps
a results table shows. ``--seeds N`` trains seeds ``train.seed, train.seed + 1, ...`` one after
another, each as an ordinary run (its own run directory ``<group>-seed<k>`` and MLflow run), and
summarises the final benign metrics over seeds: the mean and a 95% Student-t interval
(:func:`rdml.eval.intervals.t_interval`). How one seed is trained (Ray or in-process, MLflow) is the
caller's ``train_one``; this module only knows configs and results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rdml.config import ExperimentConfig, build_config
from rdml.train.loop import TrainResult


@dataclass
class SeedRun:
    """One seed of a group: its config, its training result (None if it did not run) and MLflow run."""

    seed: int
    config: ExperimentConfig
    result: TrainResult | None = None
    run_id: str | None = None
    status: str = "FINISHED"  # FINISHED | KILLED | FAILED


@dataclass
class SeedGroup:
    """The runs of ``rdml train --seeds N`` and their summary."""

    name: str
    runs: list[SeedRun] = field(default_factory=list)

    @property
    def finished(self) -> list[SeedRun]:
        return [r for r in self.runs if r.status == "FINISHED" and r.result is not None]

    def summary(self, prefix: str = "eval/") -> dict[str, Any]:
        """``{metric: Interval}`` over the finished seeds, for every final metric starting with ``prefix``
        that all of them report (a single seed gives the value with a NaN interval)."""
        from rdml.eval.intervals import t_interval

        done = self.finished
        if not done:
            return {}
        keys = [k for k in done[0].result.metrics if k.startswith(prefix)]
        keys = [k for k in keys if all(k in r.result.metrics for r in done)]
        return {k: t_interval([float(r.result.metrics[k]) for r in done]) for k in keys}


def group_name(cfg: ExperimentConfig) -> str:
    """``tracking.run_name``, else ``<name>-<timestamp>``: the prefix of every seed's run name."""
    return cfg.tracking.run_name or f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def seed_configs(cfg: ExperimentConfig, n: int, group: str) -> list[ExperimentConfig]:
    """``n`` copies of ``cfg`` with seeds ``train.seed + i`` and run names ``<group>-seed<seed>``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    base = cfg.to_dict()
    out = []
    for i in range(n):
        seed = cfg.train.seed + i
        out.append(build_config(base, [f"train.seed={seed}", f"tracking.run_name={group}-seed{seed}"]))
    return out


def train_seeds(
    cfg: ExperimentConfig, n: int, train_one: Callable[[ExperimentConfig, Mapping[str, str]], SeedRun],
    *, group: str | None = None, tags: Mapping[str, str] | None = None,
) -> SeedGroup:
    """Train ``n`` seeds of ``cfg`` in turn with ``train_one(config, tags)``; stop after a run that did
    not finish (an interrupt or a failure: the next seeds would not be comparable anyway).

    ``tags`` (e.g. the group id and the parent MLflow run) go to every seed's ``train_one`` call, plus
    ``rdml.seed``.
    """
    name = group or group_name(cfg)
    out = SeedGroup(name=name)
    for sub in seed_configs(cfg, n, name):
        run = train_one(sub, {**(tags or {}), "rdml.seed": str(sub.train.seed)})
        out.runs.append(run)
        if run.status != "FINISHED":
            break
    return out
