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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rdml.config import ExperimentConfig
from rdml.ensemble.checkpoint import Manifest, load_manifest, require_resumable, save_ensemble_checkpoint
from rdml.ensemble.combine import EnsembleModel, ensemble_from_states
from rdml.eval.protocol import evaluation_sets


class MemberFailure(RuntimeError):
    """A member died during a step; the backend has it restarted and ready for a restore."""


class EnsembleInterrupted(Exception):
    """``should_stop()`` asked the loop to stop: a checkpoint of the last finished step is on disk."""

    def __init__(self, step: int, total: int, run_dir: Path) -> None:
        super().__init__(f"stopped at step {step}/{total}; checkpoint in {run_dir}")
        self.step, self.total, self.run_dir = step, total, run_dir


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


def evaluate_ensemble(model: EnsembleModel, dataset, cfg: ExperimentConfig, device: str = "cpu",
                      gallery=None) -> dict[str, float]:
    """Benign metrics of every member (``member_k/...``) and of the combined embedding (``ensemble/...``).

    Each member embeds the test set once; the combined embedding is combined from those embeddings
    (what :class:`EnsembleModel` computes). ``embedding_spread`` (RMS pairwise distance) comes with
    every model: a collapsed member (spread below :data:`rdml.attacks.ers.COLLAPSE_SPREAD`) shows here.
    """
    import torch

    from rdml.attacks.ers import embedding_spread
    from rdml.ensemble.combine import combine_embeddings
    from rdml.eval.embed import embed
    from rdml.eval.metrics import benign_metrics

    out: dict[str, float] = {}
    bs, seed = cfg.data.eval_batch_size, cfg.eval.kmeans_seed
    embeddings, g_embeddings = [], []
    labels = g_labels = None
    for k, member in enumerate(model.members):
        emb, labels = embed(member, dataset, batch_size=bs, device=device)
        g_emb, g_labels = (None, None) if gallery is None else embed(member, gallery, batch_size=bs, device=device)
        embeddings.append(emb)
        g_embeddings.append(g_emb)
        benign = benign_metrics(emb, labels, seed=seed, gallery_emb=g_emb, gallery_labels=g_labels)
        for key, v in {**benign, "embedding_spread": embedding_spread(emb)}.items():
            out[f"member_{k}/{key}"] = float(v)
    combined = combine_embeddings([torch.from_numpy(e) for e in embeddings], model.combine).numpy()
    g_combined = None if gallery is None else combine_embeddings(
        [torch.from_numpy(e) for e in g_embeddings], model.combine).numpy()
    benign = benign_metrics(combined, labels, seed=seed, gallery_emb=g_combined, gallery_labels=g_labels)
    for key, v in {**benign, "embedding_spread": embedding_spread(combined)}.items():
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
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
) -> EnsembleResult:
    """Train the ensemble held by ``backend`` (see the module doc).

    ``log(metrics, step)`` receives every metric dict (the command passes rdml.tracking.log_metrics
    bound to its run). ``stop_after`` stops the driver after that many steps *of this call* without a
    final checkpoint, as a killed driver would (tests of ``--resume``). ``should_stop()`` is asked
    between steps (the command's SIGINT/SIGTERM flag): when it says yes, the members' states of the
    last finished step are checkpointed (unless that step already is) and :class:`EnsembleInterrupted`
    is raised, so a resume loses nothing. ``progress`` draws a bar over the steps (on a terminal, and
    unless ``TQDM_DISABLE`` is set).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spe = backend.steps_per_epoch()  # ensemble.steps_per_epoch, else train.max_steps_per_epoch, else one pass
    total = cfg.train.epochs * spe
    ckpt_every = max(1, cfg.train.checkpoint_every * spe)
    eval_every = cfg.train.eval_every * spe
    train_set, (test_set, gallery_set) = splits.train, evaluation_sets(splits)
    log = log or (lambda metrics, step: None)

    should_stop = should_stop or (lambda: False)

    history: list[dict[str, float]] = []
    if resume is not None:
        manifest = resume if isinstance(resume, Manifest) else load_manifest(resume)
        states = [manifest.member_state(k) for k in range(manifest.members)]
        for state in states:
            require_resumable(state, manifest.run_dir)  # before a backend sees it (a Ray actor would wrap the error)
        backend.load_states(states)
        step = manifest.step
    else:
        step = 0
        save_ensemble_checkpoint(run_dir, 0, backend.states(), cfg, mlflow_run_id=run_id)
    saved = step  # the step of the newest checkpoint on disk

    def ensemble_model() -> EnsembleModel:
        from rdml.tracking.modelfiles import quiet_rebuilds

        with quiet_rebuilds():  # the weights are loaded right away: not "training from scratch"
            return ensemble_from_states(cfg.model, train_set.in_channels, train_set.image_size,
                                        backend.model_states(), cfg.ensemble.combine, device)

    def stop_here() -> EnsembleInterrupted:
        if saved != step:
            save_ensemble_checkpoint(run_dir, step, backend.states(), cfg, mlflow_run_id=run_id)
        return EnsembleInterrupted(step, total, run_dir)

    recoveries, done_here = 0, 0
    max_recoveries = max(1, cfg.ensemble.max_restarts) * cfg.ensemble.members
    bar = _progress(total, step, progress)
    try:
        while step < total:
            if should_stop():
                raise stop_here()
            try:
                member_metrics = backend.step(step)
                step += 1
                done_here += 1
                row = {"step": step, "epoch": step / spe, **_mean_member_metrics(member_metrics)}
                history.append(row)
                log(row, step)
                bar.update(1)
                if "train/loss" in row:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
                if stop_after is not None and done_here >= stop_after:
                    return EnsembleResult({}, history, run_dir, step, recoveries,
                                          seconds=time.perf_counter() - t_start)
                is_last = step == total
                if eval_every and step % eval_every == 0 and not is_last and not should_stop():
                    log(evaluate_ensemble(ensemble_model(), test_set, cfg, device, gallery=gallery_set), step)
                if step % ckpt_every == 0 and not is_last:
                    save_ensemble_checkpoint(run_dir, step, backend.states(), cfg, mlflow_run_id=run_id)
                    saved = step
            except MemberFailure:
                # a member died (in a step, a checkpoint or an evaluation): restore all, replay
                recoveries += 1
                if recoveries > max_recoveries:
                    raise
                manifest = load_manifest(run_dir)
                backend.load_states([manifest.member_state(k) for k in range(manifest.members)])
                history = [h for h in history if h["step"] <= manifest.step]
                step = saved = manifest.step
                bar.n = step
                bar.refresh()
                log({"recoveries": recoveries, "replayed_from": manifest.step}, step)
    finally:
        bar.close()
    if should_stop():
        raise stop_here()

    model = ensemble_model()
    metrics = evaluate_ensemble(model, test_set, cfg, device, gallery=gallery_set)
    log(metrics, step)
    save_ensemble_checkpoint(run_dir, step, backend.states(), cfg, metrics, mlflow_run_id=run_id)
    return EnsembleResult(metrics, history, run_dir, step, recoveries, model, list(model.members),
                          seconds=time.perf_counter() - t_start)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over the ensemble steps: only when asked, on a terminal, and without TQDM_DISABLE."""
    from tqdm.auto import tqdm

    off = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    # disable=None: tqdm turns itself off when stderr is not a terminal (job logs, CI)
    return tqdm(total=total, initial=initial, desc="ensemble steps", unit="step", leave=False,
                dynamic_ncols=True, disable=True if off else None)
