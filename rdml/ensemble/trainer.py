"""The ensemble training loop, independent of where members run (one process or Ray actors).

``train_ensemble(cfg, backend, ...)`` owns the schedule: steps, periodic checkpoints (step 0 first,
so a failure is always recoverable), periodic evaluation of every member and of the combined
embedding, metric logging (the driver is the single MLflow writer), and recovery: when a backend
reports a :class:`MemberFailure`, every member is restored from the newest checkpoint and the steps
since then are replayed. Nothing else is lost.

A backend provides ``steps_per_epoch()``, ``step(step) -> [metrics per member]``, ``states()``,
``load_states(states)``, ``model_states()``, ``timing`` and ``shutdown()``
(:class:`rdml.ensemble.local.LocalEnsemble`, :class:`rdml.distributed.eat.RayEnsemble`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rdml.config import ExperimentConfig
from rdml.ensemble.checkpoint import Manifest, load_manifest, save_ensemble_checkpoint
from rdml.ensemble.combine import EnsembleModel, ensemble_from_states


class MemberFailure(RuntimeError):
    """A member died during a step; the backend has it restarted and ready for a restore."""


@dataclass
class EnsembleResult:
    """What a finished ensemble run produced."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    run_dir: Path
    steps: int
    recoveries: int
    model: EnsembleModel | None = None
    member_models: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_ensemble(model: EnsembleModel, dataset, cfg: ExperimentConfig, device: str = "cpu") -> dict[str, float]:
    """Benign metrics of every member (``member_k/...``) and of the combined embedding (``ensemble/...``)."""
    from rdml.eval import evaluate_model

    out: dict[str, float] = {}
    bs, seed = cfg.data.eval_batch_size, cfg.eval.kmeans_seed
    for k, member in enumerate(model.members):
        for key, v in evaluate_model(member, dataset, bs, device, seed=seed).items():
            out[f"member_{k}/{key}"] = float(v)
    for key, v in evaluate_model(model, dataset, bs, device, seed=seed).items():
        out[f"ensemble/{key}"] = float(v)
    return out


def _mean_member_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, m in enumerate(metrics):
        for key, v in m.items():
            out[f"member_{k}/train/{key}"] = v
    keys = set().union(*metrics) if metrics else set()
    for key in keys:
        vals = [m[key] for m in metrics if key in m]
        out[f"train/{key}"] = float(np.mean(vals))
    return out


def train_ensemble(
    cfg: ExperimentConfig,
    backend,
    splits,
    run_dir: Path,
    *,
    run_id: str | None = None,
    resume: Manifest | Path | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
    stop_after: int | None = None,
    device: str = "cpu",
) -> EnsembleResult:
    """Train the ensemble held by ``backend`` (see the module doc).

    ``log(metrics, step)`` receives every metric dict (the command passes rdml.tracking.log_metrics
    bound to its run). ``stop_after`` stops the driver after that many steps *of this call* without a
    final checkpoint, as a killed driver would (tests of ``--resume``).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spe = cfg.ensemble.steps_per_epoch or cfg.train.max_steps_per_epoch or backend.steps_per_epoch()
    total = cfg.train.epochs * spe
    ckpt_every = max(1, cfg.train.checkpoint_every * spe)
    eval_every = cfg.train.eval_every * spe
    train_set, test_set = splits.train, splits.test
    log = log or (lambda metrics, step: None)

    history: list[dict[str, float]] = []
    if resume is not None:
        manifest = resume if isinstance(resume, Manifest) else load_manifest(resume)
        backend.load_states([manifest.member_state(k) for k in range(manifest.members)])
        step = manifest.step
    else:
        step = 0
        save_ensemble_checkpoint(run_dir, 0, backend.states(), cfg, mlflow_run_id=run_id)

    def ensemble_model() -> EnsembleModel:
        return ensemble_from_states(cfg.model, train_set.in_channels, train_set.image_size,
                                    backend.model_states(), cfg.ensemble.combine, device)

    recoveries, done_here = 0, 0
    max_recoveries = max(1, cfg.ensemble.max_restarts) * cfg.ensemble.members
    while step < total:
        try:
            member_metrics = backend.step(step)
            step += 1
            done_here += 1
            row = {"step": step, "epoch": step / spe, **_mean_member_metrics(member_metrics)}
            history.append(row)
            log(row, step)
            if stop_after is not None and done_here >= stop_after:
                return EnsembleResult({}, history, run_dir, step, recoveries, seconds=time.perf_counter() - t_start)
            is_last = step == total
            if eval_every and step % eval_every == 0 and not is_last:
                log(evaluate_ensemble(ensemble_model(), test_set, cfg, device), step)
            if step % ckpt_every == 0 and not is_last:
                save_ensemble_checkpoint(run_dir, step, backend.states(), cfg, mlflow_run_id=run_id)
        except MemberFailure:
            # a member died (in a step, a checkpoint or an evaluation): restore all, replay
            recoveries += 1
            if recoveries > max_recoveries:
                raise
            manifest = load_manifest(run_dir)
            backend.load_states([manifest.member_state(k) for k in range(manifest.members)])
            history = [h for h in history if h["step"] <= manifest.step]
            step = manifest.step
            log({"recoveries": recoveries, "replayed_from": manifest.step}, step)

    model = ensemble_model()
    metrics = evaluate_ensemble(model, test_set, cfg, device)
    log(metrics, step)
    save_ensemble_checkpoint(run_dir, step, backend.states(), cfg, metrics, mlflow_run_id=run_id)
    return EnsembleResult(metrics, history, run_dir, step, recoveries, model, list(model.members),
                          seconds=time.perf_counter() - t_start)
