"""The driver of a search: parent MLflow run, Tuner, ASHA, retries, resume, Pareto front.

:func:`run_search` validates the space, pins the tracking URI and creates the store, the experiment
and the parent run *in the driver* (parallel trials racing to create a sqlite schema fail), then runs
a :class:`ray.tune.Tuner` over :func:`rdml.tune.trainable.train_trial`. Afterwards it computes the
Pareto front over the objectives (benign R@1 against ERS by default for the shipped spaces), prints
it, and logs the front plot, the front table and every front member's config as a YAML recipe that
``rdml train --config`` accepts to the parent run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdml.config import ExperimentConfig, build_config
from rdml.distributed.connect import connect
from rdml.distributed.train_ray import absolute_paths
from rdml.errors import RdmlError
from rdml.tune.pareto import front_table, pareto_front
from rdml.tune.space import SearchSpace, apply_params, load_space, to_param_space
from rdml.tune.trainable import TRIAL_TAG, train_trial

PARENT_FILE = "rdml_parent_run_id"


@dataclass
class SearchResult:
    """Every trial's last reported metrics, the Pareto front, and where things went."""

    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    objectives: dict[str, str]
    experiment_dir: Path
    parent_run_id: str | None
    recipes: list[Path] = field(default_factory=list)
    errors: int = 0


class _ChildRunCloserBase:
    """Ends a trial's child run if it is still RUNNING when Tune is done with the trial."""

    def __init__(self, uri: str, parent_run_id: str) -> None:
        self.uri, self.parent_run_id = uri, parent_run_id

    def _close(self, trial: Any, status: str) -> None:
        from rdml.tracking import child_runs, end_run_if_running

        for run in child_runs(self.parent_run_id, tracking=self.uri):
            if run.data.tags.get(TRIAL_TAG) == trial.trial_id and run.info.status == "RUNNING":
                end_run_if_running(run.info.run_id, status, tracking=self.uri)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED")  # a trial that finished normally has already ended its run

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")


def _closer(uri: str, parent_run_id: str) -> Any:
    from ray.tune import Callback

    cls = type("ChildRunCloser", (_ChildRunCloserBase, Callback), {})
    return cls(uri, parent_run_id)


def _driver_config(space: SearchSpace, base: ExperimentConfig) -> ExperimentConfig:
    """Absolute paths and a pinned tracking URI: trials run elsewhere (other CWD, other node)."""
    from rdml.tracking import resolved_uri

    cfg = absolute_paths(base)
    data = cfg.to_dict()
    data["tracking"]["uri"] = resolved_uri(cfg.tracking) if cfg.tracking.enabled else cfg.tracking.uri
    train = data["train"]
    train["eval_every"] = 1  # ASHA needs the metric in every report
    train["checkpoint_every"] = 1  # the per-epoch ERS attacks the epoch's checkpoint
    if space.scheduler.asha is not None:
        train["epochs"] = min(train["epochs"], space.scheduler.asha.max_t) if train["epochs"] else space.scheduler.asha.max_t
    return build_config(data)


def trial_resources(space: SearchSpace) -> Any:
    """A trial's reservation: its own CPUs/GPUs and, when its robustness evaluation is sharded
    (``robustness.workers``), one more bundle per attack worker (:func:`attack_worker_bundle`); the
    workers land in them (Tune places a trial's child actors in the trial's placement group)."""
    from ray import tune

    own = {"CPU": space.resources.cpu, **({"GPU": space.resources.gpu} if space.resources.gpu else {})}
    workers = space.robustness.workers if space.robustness is not None else 0
    if not workers:
        return {"cpu": space.resources.cpu, "gpu": space.resources.gpu}
    return tune.PlacementGroupFactory([own] + [attack_worker_bundle(space)] * workers)


def attack_worker_bundle(space: SearchSpace) -> dict[str, float]:
    """One attack worker's share of a trial: a CPU, and a whole GPU when the trial itself asks for one."""
    return {"CPU": 1.0, **({"GPU": 1.0} if space.resources.attack_workers_use_gpus else {})}


def _ray_init(cfg: ExperimentConfig, address: str | None) -> None:
    connect(cfg, address)


def run_search(
    space_source: str | Path | SearchSpace,
    overrides: list[str] | tuple[str, ...] = (),
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
    storage_path: str | Path | None = None,
    name: str | None = None,
    verbose: int = 0,
) -> SearchResult:
    """Run (or resume) the search described by ``space_source`` and return the trials and front."""
    from ray import tune

    from rdml.tracking import end_run, log_dict, log_params, start_run

    if isinstance(space_source, SearchSpace):
        space = space_source
        from rdml.tune.space import validate_space

        base = validate_space(space, overrides)
    else:
        space, base = load_space(space_source, overrides)
    cfg = _driver_config(space, base)
    name = name or space.name
    storage = Path(storage_path).resolve() if storage_path else Path(cfg.train.output_dir) / "tune"
    exp_dir = storage / name
    samples = num_samples or space.num_samples
    objectives = space.all_objectives

    parent_run_id: str | None = None
    restoring = resume and tune.Tuner.can_restore(str(exp_dir))
    if restoring and (exp_dir / PARENT_FILE).exists():
        parent_run_id = (exp_dir / PARENT_FILE).read_text().strip() or None
    if parent_run_id is None and cfg.tracking.enabled:
        parent_run_id = start_run(cfg, tags={"rdml.kind": "tune-search", "rdml.search": space.name},
                                  run_name=f"tune-{name}")
        log_params(parent_run_id, {"tune.space": space.name, "tune.num_samples": samples,
                                   "tune.metric": space.metric, "tune.mode": space.mode,
                                   "tune.objectives": ",".join(f"{k}:{m}" for k, m in objectives.items())})
        log_dict(parent_run_id, space.model_dump(mode="json", exclude={"source"}), "search_space.yaml")

    _ray_init(cfg, address)
    trainable = tune.with_resources(train_trial, trial_resources(space))
    status = "FAILED"
    try:
        if restoring:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
        else:
            exp_dir.mkdir(parents=True, exist_ok=True)
            if parent_run_id is not None:
                (exp_dir / PARENT_FILE).write_text(parent_run_id)
            param_space = {
                "params": to_param_space(space),
                "base": cfg.to_dict(),
                "space": space.model_dump(mode="json"),
                "parent_run_id": parent_run_id,
            }
            scheduler = None
            if space.scheduler.asha is not None:
                a = space.scheduler.asha
                scheduler = tune.schedulers.ASHAScheduler(
                    time_attr="training_iteration", max_t=min(a.max_t, max(cfg.train.epochs, 1)),
                    grace_period=min(a.grace_period, max(cfg.train.epochs, 1)), reduction_factor=a.reduction_factor,
                )
            callbacks = [_closer(cfg.tracking.uri, parent_run_id)] if parent_run_id else []
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                            num_samples=samples),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage), callbacks=callbacks, verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                ),
            )
        grid = tuner.fit()
        result = _summarise(grid, space, cfg, exp_dir, parent_run_id)
        status = "FINISHED"
        return result
    finally:
        if parent_run_id is not None:
            _close_children(cfg.tracking.uri, parent_run_id)
            end_run(parent_run_id, status, tracking=cfg.tracking.uri)


def _close_children(uri: str, parent_run_id: str) -> None:
    """Belt and braces: no child run of a finished search stays RUNNING."""
    from rdml.tracking import child_runs, end_run_if_running

    for run in child_runs(parent_run_id, tracking=uri):
        if run.info.status == "RUNNING":
            end_run_if_running(run.info.run_id, "KILLED", tracking=uri)


def _summarise(grid: Any, space: SearchSpace, cfg: ExperimentConfig, exp_dir: Path,
               parent_run_id: str | None) -> SearchResult:
    from rich.console import Console

    from rdml.tracking import log_artifact, log_dict, log_figure, log_metrics
    from rdml.tracking.plots import pareto_figure

    objectives = space.all_objectives
    trials: list[dict[str, Any]] = []
    errors = 0
    for res in grid:
        if res.error is not None:
            errors += 1
        metrics = dict(res.metrics or {})
        params = dict((res.config or {}).get("params", {}))
        row = {"trial_id": metrics.get("trial_id", Path(str(res.path)).name), "params": params,
               "epochs": metrics.get("training_iteration", 0)}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        trials.append(row)
    front = [dict(p) for p in pareto_front(trials, objectives)]
    if not front:
        raise RdmlError(
            f"no trial of search {space.name} reported {', '.join(objectives)} ({errors} of {len(trials)} errored); "
            f"see the trial logs under {exp_dir}"
        )
    keys = list(space.params)
    Console(width=200).print(front_table(front, objectives, keys, title=f"{space.name}: Pareto front ({len(front)} of {len(trials)} trials)"))

    recipes_dir = exp_dir / "pareto"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    recipes: list[Path] = []
    base = build_config(cfg.to_dict())
    for p in front:
        trial_cfg = apply_params(base, p["params"])
        data = trial_cfg.to_dict()
        data["name"] = f"{space.name}-{p['trial_id']}"
        path = recipes_dir / f"{p['trial_id']}.yaml"
        header = "# Pareto-front config from `rdml tune` (" + ", ".join(f"{k}={float(p[k]):.4f}" for k in objectives) + ")\n"
        import yaml

        path.write_text(header + yaml.safe_dump(data, sort_keys=False))
        recipes.append(path)
    primary = next(iter(objectives))
    best = max(front, key=lambda p: float(p[primary]) * (1 if objectives[primary] == "max" else -1))
    (recipes_dir / "best.yaml").write_text(Path(recipes_dir / f"{best['trial_id']}.yaml").read_text())
    summary = {"objectives": objectives, "front": front, "trials": trials}
    (exp_dir / "pareto.json").write_text(json.dumps(summary, indent=2, default=str))

    if parent_run_id is not None:
        uri = cfg.tracking.uri
        names = list(objectives)
        if len(names) >= 2:
            fig = pareto_figure([t for t in trials if all(k in t for k in names)], names[0], names[1], front,
                                label_key="trial_id")
            log_figure(parent_run_id, fig, "pareto/front.png", tracking=uri)
        log_dict(parent_run_id, summary, "pareto/front.json", tracking=uri)
        log_artifact(parent_run_id, recipes_dir, "pareto/recipes", tracking=uri)
        log_metrics(parent_run_id, {"tune/trials": len(trials), "tune/front_size": len(front), "tune/errors": errors,
                                    **{f"best/{k}": float(best[k]) for k in objectives}}, step=0, tracking=uri)
    return SearchResult(trials=trials, front=front, objectives=objectives, experiment_dir=exp_dir,
                        parent_run_id=parent_run_id, recipes=recipes, errors=errors)
