"""Train an EAT ensemble: one Ray actor per member, exchanging robustness statistics (self-transfer).

Examples::

    rdml ensemble --config digits-eat                   # 3 members on a local Ray, CPU
    rdml ensemble --config digits-eat --members 5 --set ensemble.self_transfer=cross_member
    rdml ensemble --address ray://head:10001 --config cub-eat
    rdml ensemble --resume runs/digits-eat-20250101-120000   # continue from its manifest.json

The run ends with a table of every member and of the combined embedding: clean metrics, the quick
ERS attacks and the clustering attacks (``eval.profile`` overrides the profiles, comma-separated).
The final checkpoint (manifest + member files) and the combined model are logged to the MLflow run.

Ctrl-C (SIGINT) or SIGTERM during training stops after the step in progress (rdml's policy,
:mod:`rdml.train.stop`, as for ``rdml train``): the member actors are stopped, a checkpoint of the
last finished step is written (and logged), the MLflow run is marked KILLED, one line gives the
``--resume`` command, and the exit status is 130 (SIGINT) or 143 (SIGTERM). A second signal stops at
once (the newest checkpoint stays); before training and in the final evaluation the first one does.
``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from types import FrameType

from rdml.commands.common import add_config_arguments
from rdml.config import build_config, load_config
from rdml.errors import ConfigError
from rdml.train.stop import Interrupted, StopSignals, signal_name

_FIX_OUTPUT = ("Point it at storage every node sees and that outlives the job: --set "
               "train.output_dir=/shared/rdml-runs or --run-dir /shared/rdml-runs/NAME (docs/cluster.md).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--members", "-m", type=int, default=None,
                        help="ensemble size M >= 1 (ensemble.members); --members 1 also sets ensemble.parts=1 and "
                             "ensemble.self_transfer=none unless --set gives them: one member on the whole training "
                             "set, exactly `rdml train`")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, else local)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="run directory holding manifest.json")
    parser.add_argument("--run-dir", default=None, help="where checkpoints go (default train.output_dir/<name>-<time>)")
    parser.add_argument("--no-ray", action="store_true", help="step the members in turn in this process")
    parser.add_argument("--no-attacks", action="store_true", help="skip the final robustness evaluation")


def build_ensemble_config(args: argparse.Namespace):
    """The config: the resumed run's own config, else --config; then --set and --members.

    ``--members`` goes through the config's validation like ``--set ensemble.members=...`` (``0`` is
    refused there, not silently replaced by the default). ``--members 1`` also means ``ensemble.parts=1``
    and ``ensemble.self_transfer=none`` (one model on the whole training set: there is nobody to transfer
    from) unless ``--set`` gives them.
    """
    extra = [f"ensemble.members={args.members}"] if args.members is not None else []
    given = {o.split("=", 1)[0].strip() for o in args.overrides}
    if args.members == 1:
        extra += [f"{key}={value}" for key, value in (("ensemble.parts", 1), ("ensemble.self_transfer", "none"))
                  if key not in given]
    if args.resume:
        from rdml.ensemble import load_manifest

        manifest = load_manifest(args.resume)
        cfg = build_config(manifest.config.to_dict(), [*args.overrides, *extra])
        if cfg.ensemble.members != manifest.members:
            raise ConfigError(f"{manifest.run_dir} holds {manifest.members} members; --resume continues them, so "
                              f"ensemble.members cannot change (got {cfg.ensemble.members}): drop --members")
        return cfg, manifest
    return load_config(args.config, [*args.overrides, *extra]), None


NOTICE = ("rdml ensemble: {signal} received: stopping after the current step and writing a checkpoint "
          "(send it again to stop at once)")


class _EnsembleStop(StopSignals):
    """rdml's SIGINT/SIGTERM policy (:class:`rdml.train.stop.StopSignals`), by phase of the command.

    ``training``: the first signal asks :func:`train_ensemble` to stop after the step in progress (a
    checkpoint of it is written), a second one raises :class:`Interrupted` at once. ``setup`` (Ray,
    actors, data) and the final evaluation: nothing would be lost, so the first signal stops at once.
    ``cleanup``: signals are remembered, never interrupt the shutdown of the actors and the run.
    """

    phase = "setup"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.phase == "training":
            super()._handle(signum, frame)
            return
        self.request(signum)
        if self.phase != "cleanup":
            raise Interrupted(signum)


class _Once(logging.Filter):
    """Each distinct message once: M identical members would each say "training from scratch"."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def run(args: argparse.Namespace) -> int:
    once, model_log = _Once(), logging.getLogger("rdml.models.resnet")
    model_log.addFilter(once)
    try:
        return _run(args)
    finally:
        model_log.removeFilter(once)


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble, train_ensemble
    from rdml.ensemble.summary import default_profiles, print_table, robustness_of, table_rows
    from rdml.ensemble.trainer import EnsembleInterrupted
    from rdml.jobenv import require_durable_dir
    from rdml.train import default_run_dir, resolve_device

    cfg, manifest = build_ensemble_config(args)
    from rdml.ensemble.validate import check_ensemble

    check_ensemble(cfg)  # the defense, ensemble.* and the mode's requirements together, before anything starts
    if args.no_ray and cfg.eval.workers:
        raise ConfigError(f"eval.workers={cfg.eval.workers} shards the final evaluation over Ray actors, but --no-ray "
                          "runs without Ray: drop --no-ray, or --set eval.workers=0")
    splits = build_datasets(cfg.data)  # DataError now, before Ray or MLflow start
    from rdml.data.check import check_dataset

    check_dataset(cfg.data)  # a missing or corrupt image is named now, not after an epoch
    run_dir = Path(manifest.run_dir if manifest else (args.run_dir or default_run_dir(cfg))).resolve()
    require_durable_dir(run_dir, "its checkpoints", _FIX_OUTPUT)
    if cfg.tracking.enabled:
        from rdml.tracking import check_reachable, resolved_uri

        check_reachable(resolved_uri(cfg.tracking))  # TrackingError now, before Ray starts

    stop = _EnsembleStop(notice=NOTICE).install()
    run_id: str | None = None
    status, backend, started, stopped = "FAILED", None, False, None
    try:
        # the members' resources first: a cluster that cannot host them fails before any MLflow run exists
        if args.no_ray:
            import torch

            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            backend = LocalEnsemble(cfg, splits.train, resolve_device(cfg))
        else:
            from rdml.distributed.eat import RayEnsemble, ensure_ray

            started = ensure_ray(cfg, args.address)
            stop.install()  # after ray.init, which replaced the SIGTERM handler
            backend = RayEnsemble(cfg, splits.train)
        run_id = _open_run(cfg, manifest)

        def log(metrics: dict[str, float], step: int) -> None:
            if run_id is not None:
                from rdml.tracking import log_metrics

                log_metrics(run_id, metrics, step, tracking=cfg.tracking)

        print(f"rdml ensemble: {cfg.ensemble.members} members ({backend.name}), defense={cfg.defense.name}, "
              f"self_transfer={cfg.ensemble.self_transfer}, checkpoints in {run_dir}", flush=True)
        stop.phase = "training"
        result = train_ensemble(cfg, backend, splits, run_dir, run_id=run_id, resume=manifest, log=log,
                                should_stop=stop, progress=True)
        stop.phase = "evaluation"
        stop.check()  # a signal during the final evaluation of the members: all is saved, stop now
        _log_outputs(run_id, cfg, run_dir, splits.train, result.model)
        names = [f"member_{k}" for k in range(cfg.ensemble.members)] + ["ensemble"]
        robust: dict[str, dict[str, float]] = {}
        if not args.no_attacks:
            robust = _robustness(cfg, backend, splits, result, default_profiles, robustness_of)
            log({f"{n}/robust/{k}": v for n, row in robust.items() for k, v in row.items()}, result.steps)
        report = {"steps": result.steps, "recoveries": result.recoveries, "seconds": result.seconds,
                  "benign": result.metrics, "robustness": robust}
        (run_dir / "ensemble_report.json").write_text(json.dumps(report, indent=2))
        if run_id is not None:
            from rdml.tracking import log_dict

            log_dict(run_id, report, "ensemble_report.json", tracking=cfg.tracking)
        print_table(f"{cfg.name}: members and ensemble ({result.steps} steps, {result.seconds:.0f} s)",
                    table_rows(result.metrics, robust, names), names)
        print(f"run directory: {run_dir}")
        status = "FINISHED"
    except EnsembleInterrupted as exc:
        stopped = exc.step
    except Interrupted:
        stopped = -1
    finally:
        stop.phase = "cleanup"
        if backend is not None:
            backend.shutdown()  # kills the member actors: nothing runs on after the driver stops
        if started:
            from rdml.distributed.eat import shutdown_ray

            shutdown_ray()
        if run_id is not None:
            from rdml.tracking import end_run

            end_run(run_id, "KILLED" if stopped is not None else status, tracking=cfg.tracking)
        stop.uninstall()
    if stopped is None:
        return 0
    _log_checkpoint(run_id, cfg, run_dir)
    print(_resume_line(stop.signum or signal.SIGINT, run_dir, cfg), file=sys.stderr, flush=True)
    return stop.exit_code


def _open_run(cfg, manifest) -> str | None:
    """A new MLflow run, or (``--resume``) the run the manifest names, reopened."""
    if not cfg.tracking.enabled:
        return None
    from rdml.tracking import resume_run, start_run

    tags = {"rdml.kind": "eat-ensemble"}
    if manifest is not None and manifest.mlflow_run_id:
        return resume_run(cfg, manifest.mlflow_run_id, tags=tags)
    return start_run(cfg, tags=tags)


def _final_files(run_dir: Path) -> list[str]:
    """``manifest.json`` and the member files it names (the newest complete checkpoint)."""
    from rdml.ensemble import load_manifest

    return ["manifest.json", *load_manifest(run_dir).files]


def _log_outputs(run_id: str | None, cfg, run_dir: Path, train_set, model) -> None:
    """The final checkpoint (as ``checkpoints/``, a run directory ``--resume`` accepts) and the model."""
    if run_id is None:
        return
    from rdml.tracking import log_files, log_model, model_spec

    log_files(run_id, run_dir, _final_files(run_dir), "checkpoints", tracking=cfg.tracking)
    if cfg.tracking.log_model and model is not None:
        spec = model_spec(cfg, train_set.in_channels, train_set.image_size, members=cfg.ensemble.members,
                          combine=cfg.ensemble.combine)
        log_model(run_id, model, "model", tracking=cfg.tracking, spec=spec)


def _log_checkpoint(run_id: str | None, cfg, run_dir: Path) -> None:
    """After an interrupt: upload the checkpoint just written (best effort; it is on disk either way)."""
    if run_id is None or not (run_dir / "manifest.json").is_file():
        return
    from rdml.tracking import log_files

    try:
        log_files(run_id, run_dir, _final_files(run_dir), "checkpoints", tracking=cfg.tracking)
    except Exception as exc:  # noqa: BLE001 - the local checkpoint is what --resume needs
        warnings.warn(f"could not log the checkpoint to MLflow ({type(exc).__name__}: {exc})", stacklevel=2)


def _resume_line(signum: int, run_dir: Path, cfg) -> str:
    name = signal_name(signum)
    if not (run_dir / "manifest.json").is_file():
        return f"rdml ensemble: stopped by {name} before the first checkpoint; nothing to resume, start it again"
    from rdml.ensemble import load_manifest

    step = load_manifest(run_dir).step
    total = cfg.train.epochs * (cfg.ensemble.steps_per_epoch or cfg.train.max_steps_per_epoch or 0)
    at = f"step {step}/{total}" if total else f"step {step}"
    from rdml.jobenv import in_ray_job

    again = (f"ray job submit ... -- python jobs/ensemble.py --resume {run_dir}" if in_ray_job()
             else f"rdml ensemble --resume {run_dir}")
    return f"rdml ensemble: stopped by {name}; checkpoint at {at} in {run_dir}; resume with: {again}"


def _robustness(cfg, backend, splits, result, default_profiles, robustness_of) -> dict[str, dict[str, float]]:
    import time

    import torch

    from rdml.eval.protocol import evaluation_sets

    t0 = time.perf_counter()
    profiles = default_profiles(cfg, splits.test.image_size)
    queries, gallery = evaluation_sets(splits)  # In-Shop: its queries attack against its gallery
    wait = backend.member_robustness(profiles)  # members attack themselves in their actors...
    threads = torch.get_num_threads()
    if backend.name == "ray":  # ...while the driver attacks the ensemble: no OpenMP oversubscription
        torch.set_num_threads(cfg.train.threads or 1)
    try:
        from rdml.distributed.attack_workers import attack_workers

        # the ensemble's attacks sharded over attack workers (eval.workers; refused with --no-ray)
        with attack_workers(cfg.eval.workers, threads=cfg.eval.worker_threads) as workers:
            if workers is not None:
                print(f"attacking the ensemble on {cfg.eval.workers} attack workers", flush=True)
            robust = robustness_of({"ensemble": result.model}, queries, cfg, profiles, gallery=gallery,
                                   executor=workers)
    finally:
        torch.set_num_threads(threads)
    robust.update({f"member_{k}": row for k, row in enumerate(wait())})
    print(f"robustness ({', '.join(profiles)}) of {len(robust)} models: {time.perf_counter() - t0:.0f} s")
    return robust
