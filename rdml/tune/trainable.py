"""The Tune trial: rdml's own training, in-process, reporting benign R@1 and ERS each epoch.

A trial is a *function* trainable (:func:`train_trial`): it builds the trial's config from the base
config plus the sampled params, opens a child MLflow run under the search's parent run, and calls
:func:`rdml.train.fit` with two callbacks: :class:`~rdml.tracking.RunLogger` (curves into the child
run) and :class:`TuneReporter` (``tune.report`` per epoch, with a quick ERS estimate from the epoch's
checkpoint). EAT trials call :func:`rdml.ensemble.train_ensemble` instead; multi-worker trials
(``train.workers > 1``) run Ray Train inside the trial and report once, at the end.

A trial always ends its child run (``finally``); when ASHA stops a trial its process may be torn
down before that, so the driver's :class:`ChildRunCloser` ends what is still RUNNING as KILLED.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rdml.config import ExperimentConfig
from rdml.tune.space import SearchSpace, apply_params

#: tag that ties a child run to its Tune trial (no dots: easy to filter on)
TRIAL_TAG = "rdml_trial_id"


def tune_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What a trial reports: benign metrics without their prefix (``recall@1``, ``nmi``, ...), the loss."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        for prefix in ("eval/", "ensemble/"):
            if key.startswith(prefix):
                out[key[len(prefix):]] = float(value)
    if "train/loss" in metrics:
        out["loss"] = float(metrics["train/loss"])
    return out


def quick_robustness(model: Any, cfg: ExperimentConfig, space: SearchSpace, splits: Any, device: Any) -> dict[str, float]:
    """ERS (and collapse flag) of ``model`` with the space's cheap attack profile, on the data set's
    evaluation sets (:func:`rdml.eval.protocol.evaluation_sets`: In-Shop attacks queries against its gallery)."""
    from rdml.eval.protocol import evaluation_sets
    from rdml.eval.robustness import evaluate_robustness

    rob = space.robustness
    assert rob is not None
    queries, gallery = evaluation_sets(splits)
    from rdml.distributed.attack_workers import attack_workers

    # sharded over attack workers in the trial's own bundles (rdml.tune.search.trial_resources)
    with attack_workers(rob.workers, gpus=space.resources.attack_workers_use_gpus) as workers:
        res = evaluate_robustness(model, queries, rob.profile, device=device, seed=cfg.eval.attack_seed,
                                  max_queries=rob.max_queries, progress=False, gallery=gallery, executor=workers)
    out = {"ers": float(res["ers"])} if "ers" in res else {}
    if "collapse" in res:
        out["collapse"] = float(res["collapse"])
    return out


class TuneReporter:
    """Training callback: ``tune.report`` after every epoch (benign metrics + the latest ERS)."""

    def __init__(self, cfg: ExperimentConfig, space: SearchSpace, run_id: str | None, device: Any) -> None:
        self.cfg, self.space, self.run_id, self.device = cfg, space, run_id, device
        self._checkpoint: str | None = None
        self._robust: dict[str, float] = {}
        self._splits = None
        self.last: dict[str, float] = {}
        self.final_reported = False

    def on_checkpoint(self, path: Any) -> None:
        self._checkpoint = str(path)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        from ray import tune

        report = tune_metrics(metrics)
        rob = self.space.robustness
        last = epoch >= self.cfg.train.epochs
        if rob is not None and self._checkpoint and (last or epoch % rob.every == 0):
            from rdml.train import load_model

            model, _ = load_model(self._checkpoint, device=self.device)
            self._robust = quick_robustness(model, self.cfg, self.space, self.splits(), self.device)
            if self.run_id is not None:
                from rdml.tracking import log_metrics

                log_metrics(self.run_id, {f"robust/{k}": v for k, v in self._robust.items()}, step=epoch)
        report.update(self._robust)
        report["epoch"] = float(epoch)
        self.last = report
        self.final_reported = last
        tune.report(report)  # raises SystemExit when the scheduler stops the trial

    def splits(self) -> Any:
        if self._splits is None:
            from rdml.data import build_datasets

            self._splits = build_datasets(self.cfg.data)
        return self._splits


def trial_config(config: dict[str, Any]) -> tuple[ExperimentConfig, SearchSpace]:
    """The trial's validated config and its space from the Tune trial config."""
    space = SearchSpace.model_validate(config["space"])
    base = ExperimentConfig.model_validate(config["base"])
    return apply_params(base, dict(config.get("params", {}))), space


def train_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable (see the module doc)."""
    import torch
    from ray import tune

    from rdml.tracking import end_run, start_run

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg, space = trial_config(config)
    threads = max(1, int(space.resources.cpu))
    torch.set_num_threads(cfg.train.threads or threads)
    run_dir = Path(ctx.get_trial_dir()) / "run"
    run_id = None
    if cfg.tracking.enabled and config.get("parent_run_id"):
        tags = {TRIAL_TAG: trial_id, "rdml.search": space.name}
        params = config.get("params", {})
        if "defense.hm_schedule" in params:
            tags["rdml.hm_schedule"] = str(params["defense.hm_schedule"])
        run_id = start_run(cfg, parent_run_id=config["parent_run_id"], nested=True, tags=tags,
                           run_name=f"{space.name}-{trial_id}")
    status = "FAILED"
    progress = {"final_reported": False}
    try:
        if space.kind == "ensemble":
            _ensemble_trial(cfg, space, run_id, run_dir, progress)
        elif cfg.train.workers > 1:
            _ray_train_trial(cfg, space, run_id, run_dir, progress)
        else:
            _fit_trial(cfg, space, run_id, run_dir, progress)
        status = "FINISHED"
    except SystemExit:
        # tune.report exits the trial's thread when the scheduler stops it; after the last epoch's
        # report that is a normal end (ASHA stops at max_t), before it an early stop
        status = "FINISHED" if progress["final_reported"] else "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_id is not None:
            try:
                end_run(run_id, status)
            except Exception:  # noqa: BLE001 - the driver's ChildRunCloser ends it then
                pass


def _fit_trial(cfg: ExperimentConfig, space: SearchSpace, run_id: str | None, run_dir: Path,
               progress: dict[str, bool]) -> None:
    from rdml.tracking import RunLogger
    from rdml.train import fit, resolve_device

    device = resolve_device(cfg, None)
    callbacks: list[Any] = []
    if run_id is not None:
        # the model and its embedding picture belong to the best configs, not to every trial
        callbacks.append(RunLogger(run_id, cfg.tracking, final_artifacts=False))
    reporter = TuneReporter(cfg, space, run_id, device)
    callbacks.append(reporter)
    try:
        fit(cfg, callbacks=callbacks, run_dir=run_dir, device=device)
    finally:
        progress["final_reported"] = reporter.final_reported


def _ray_train_trial(cfg: ExperimentConfig, space: SearchSpace, run_id: str | None, run_dir: Path,
                     progress: dict[str, bool]) -> None:
    """``train.workers > 1``: Ray Train DDP inside the trial; one report with the final metrics."""
    from ray import tune

    from rdml.distributed.train_ray import train_with_ray
    from rdml.train import load_model

    result = train_with_ray(cfg, run_id=run_id, run_dir=run_dir)
    report = tune_metrics(result.metrics)
    if space.robustness is not None and result.checkpoint is not None:
        model, _ = load_model(result.checkpoint, device="cpu")
        from rdml.data import build_datasets

        rob = quick_robustness(model, cfg, space, build_datasets(cfg.data), "cpu")
        report.update(rob)
        if run_id is not None:
            from rdml.tracking import log_metrics

            log_metrics(run_id, {f"robust/{k}": v for k, v in rob.items()}, step=cfg.train.epochs)
    report["epoch"] = float(cfg.train.epochs)
    progress["final_reported"] = True
    tune.report(report)


def _ensemble_trial(cfg: ExperimentConfig, space: SearchSpace, run_id: str | None, run_dir: Path,
                    progress: dict[str, bool]) -> None:
    """EAT in the trial: the in-process backend (members share the trial's CPUs), ERS at the end."""
    from ray import tune

    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble, train_ensemble
    from rdml.tracking import log_metrics
    from rdml.train import resolve_device

    device = resolve_device(cfg, None)
    splits = build_datasets(cfg.data)
    backend = LocalEnsemble(cfg, splits.train, device=device)
    reported: dict[str, float] = {}
    n_reports = 0

    def log(metrics: dict[str, float], step: int) -> None:
        nonlocal n_reports
        if run_id is not None:
            log_metrics(run_id, metrics, step=step)
        benign = tune_metrics(metrics)
        if "recall@1" in benign:
            reported.update(benign)
            n_reports += 1
            if n_reports < cfg.train.epochs:  # the last report carries ERS too (below)
                tune.report({**reported, "epoch": float(n_reports)})

    result = train_ensemble(cfg, backend, splits, run_dir, run_id=run_id, log=log, device=str(device))
    final = dict(reported)
    final.update(tune_metrics(result.metrics))
    if space.robustness is not None and result.model is not None:
        rob = quick_robustness(result.model, cfg, space, splits, device)
        final.update(rob)
        if run_id is not None:
            log_metrics(run_id, {f"robust/{k}": v for k, v in rob.items()}, step=result.steps)
    final["epoch"] = float(max(n_reports, cfg.train.epochs))
    progress["final_reported"] = True
    tune.report({k: v for k, v in final.items() if not (isinstance(v, float) and math.isnan(v))})
