"""Train one model: Ray Train with ``--workers N`` data-parallel workers (DDP), or in-process (--no-ray).

Everything that can be checked is checked before Ray starts (config and options, the data set: every
image file exists and its header decodes, the tracking store), so a typo or a corrupt image costs
seconds, not a cluster start or an epoch. The driver creates the MLflow run; rank 0 logs the curves,
the final checkpoint, the plots and the model to it; the command ends with a table of the final
benign metrics on the test split.

Interrupts: Ctrl-C (SIGINT) or SIGTERM stops the workers after their current step, writes a checkpoint
of that state (it resumes exactly, mid-epoch included), marks the MLflow run KILLED, prints one line
with the resume command and exits 130 (SIGINT) or 143 (SIGTERM); a second signal stops at once,
keeping the last checkpoint written. ``--resume`` continues the same MLflow run (its id is stored in
every checkpoint); if the store no longer has it, a new run is linked to it (tag
``rdml.resumed_from`` and parent id). The run's ``rdml.status`` tag ends as finished, killed or failed.

``--seeds N`` trains seeds ``train.seed .. train.seed+N-1`` one after another, each with its own run
directory (``<run name>-seed<k>``) and MLflow run under one parent run (tag ``rdml.seed_group``), and
prints the mean and 95% t-interval of each final metric over the seeds and every run's checkpoint.

Examples::

    rdml train --config digits                          # the demo: 8 epochs of c2f2 on digits
    rdml train --config digits --workers 2              # 2 DDP workers on a local Ray
    rdml train --config mnist5k --seeds 3               # three seeds, mean and 95% interval
    rdml train --config cub-hm-sglga-ics --address ray://head:10001
    rdml train --resume runs/digits-c2f2-20250101-120000 --epochs 12
"""

from __future__ import annotations

import argparse
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdml.commands.common import add_config_arguments
from rdml.commands.options import at_least
from rdml.config import ExperimentConfig, build_config, load_config
from rdml.errors import ConfigError
from rdml.train.stop import Interrupted, StopSignals, signal_name

#: key of a checkpoint's ``extra`` holding the MLflow run it was logged to (``--resume`` reopens it)
RUN_ID_KEY = "mlflow_run_id"
NOTICE = ("rdml train: {signal} received: stopping after the current step and writing a checkpoint "
          "(send it again to stop at once)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workers", type=at_least(1, "Ray Train DDP workers, train.workers"), default=None,
                        help="Ray Train DDP workers (train.workers)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default ray.address; none: local Ray)")
    parser.add_argument("--resume", default=None, metavar="PATH", help="checkpoint file or run directory to continue")
    parser.add_argument("--epochs", type=at_least(1, "total epochs, train.epochs"), default=None,
                        help="total epochs (train.epochs)")
    parser.add_argument("--seeds", type=at_least(1, "number of seeds to train"), default=None, metavar="N",
                        help="train N seeds (train.seed, +1, ...) in turn; summary with mean and 95%% interval")
    parser.add_argument("--no-ray", action="store_true", help="train in this process without Ray (debugging)")


def build_train_config(args: argparse.Namespace, ckpt: Any = None) -> ExperimentConfig:
    """The run's config: --config (or, when resuming without one, the checkpoint's own), --set, flags."""
    extra = []
    if args.workers is not None:
        extra.append(f"train.workers={args.workers}")
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.resume is not None and args.config is None:
        if ckpt is None:
            from rdml.train import load_checkpoint

            ckpt = load_checkpoint(args.resume)
        return build_config(ckpt.config.to_dict(), [*args.overrides, *extra])
    return load_config(args.config, [*args.overrides, *extra])


def _preflight(cfg: ExperimentConfig) -> None:
    """Fail fast (RdmlError) on missing data or unreadable image files before any run or Ray is created."""
    from rdml.data import build_datasets
    from rdml.data.check import check_dataset

    build_datasets(cfg.data)
    check_dataset(cfg.data)


def _check_resume(cfg: ExperimentConfig, ckpt: Any) -> None:
    """Refuse a resume with nothing left to train (it would only re-report the checkpoint's metrics).

    A checkpoint written on a stop inside epoch ``ckpt.epoch + 1`` needs that epoch, like any other.
    """
    if cfg.train.epochs <= ckpt.epoch:
        raise ConfigError(
            f"{ckpt.path} has finished epoch {ckpt.epoch} of train.epochs={cfg.train.epochs}: nothing left to train. "
            f"Pass --epochs N with N > {ckpt.epoch} to train further, or evaluate it with `rdml evaluate {ckpt.path}`"
        )


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint file (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def split_title(cfg: ExperimentConfig) -> str:
    """What the test split is, for the table title: unseen classes (zero-shot) or the training classes."""
    from rdml.data import get_reader
    from rdml.data.readers import IdxReader

    reader = get_reader(cfg.data.name)
    protocol = getattr(reader, "protocol", None)
    if callable(protocol):
        split = protocol(cfg.data)
    else:
        split = "same_classes" if isinstance(reader, IdxReader) else "zero_shot"
    return "unseen test classes, zero-shot" if split == "zero_shot" else "test images of the training classes"


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """A rich table of the final benign metrics (eval/*) plus the last training loss."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key.startswith("eval/") or key in ("train/loss", "epoch"):
            table.add_row(key.removeprefix("eval/"), f"{value:.4f}" if key != "epoch" else f"{int(value)}")
    console.print(table)


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Outcome:
    """How one training run ended."""

    result: Any  # TrainResult | None (None: interrupted before training returned)
    run_id: str | None
    status: str  # FINISHED | KILLED | FAILED
    run_dir: Path
    checkpoint: Path | None


def _open_run(cfg: ExperimentConfig, ckpt: Any, tags: dict[str, str], parent_run_id: str | None) -> str | None:
    """The MLflow run to log into: the checkpoint's own run reopened on resume, else a new one."""
    if not cfg.tracking.enabled:
        return None
    from rdml.tracking import resume_run, set_tags, start_run

    previous = ckpt.extra.get(RUN_ID_KEY) if ckpt is not None else None
    if previous:
        run_id = resume_run(cfg, previous, tags=tags)
        if run_id is not None and run_id != previous:  # the store no longer has it: link the new run to it
            set_tags(run_id, {"mlflow.parentRunId": previous})
        return run_id
    return start_run(cfg, parent_run_id=parent_run_id, tags=tags)


def _close_run(run_id: str | None, status: str) -> None:
    """End the run with ``status`` and the matching ``rdml.status`` tag (finished, killed or failed).

    Best effort: a store that stopped answering must not hide why training ended.
    """
    if run_id is None:
        return
    from rdml.tracking import end_run, set_tags

    try:
        set_tags(run_id, {"rdml.status": status.lower()})
        end_run(run_id, status)
    except Exception as exc:  # noqa: BLE001
        print(f"rdml train: warning: could not mark MLflow run {run_id} {status} ({type(exc).__name__}: {exc})",
              file=sys.stderr)


def train_one(
    cfg: ExperimentConfig, *, stop: StopSignals, resume: str | Path | None = None, ckpt: Any = None,
    no_ray: bool = False, address: str | None = None, tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Outcome:
    """Train one run (Ray Train, or in-process with ``no_ray``), with its MLflow run opened and closed.

    Returns how it ended; an interrupt is an outcome (status KILLED), an error is raised after the run
    is marked FAILED.
    """
    from rdml.distributed.train_ray import absolute_paths
    from rdml.train import default_run_dir, resolve_checkpoint

    cfg = absolute_paths(cfg)
    if resume is not None:
        run_dir = run_dir_of(resolve_checkpoint(resume).resolve())
    else:
        run_dir = default_run_dir(cfg).resolve()
    run_id = _open_run(cfg, ckpt, dict(tags or {}), parent_run_id)
    extra = {RUN_ID_KEY: run_id} if run_id else {}
    status, result = "FAILED", None
    try:
        stop.check()
        if no_ray:
            from rdml.train import fit
            from rdml.train.progress import EpochLine

            callbacks: list[Any] = [EpochLine(cfg.train.epochs)]
            if run_id is not None:
                from rdml.tracking import RunLogger

                callbacks.append(RunLogger(run_id, cfg.tracking))
            result = fit(cfg, callbacks=callbacks, resume=resume, run_dir=run_dir, should_stop=stop,
                         checkpoint_extra=extra)
        else:
            from rdml.distributed.train_ray import train_with_ray

            result = train_with_ray(cfg, resume=resume, run_id=run_id, address=address, run_dir=run_dir,
                                    stop=stop, checkpoint_extra=extra)
        status = "KILLED" if result.stopped else "FINISHED"
    except Interrupted as exc:  # a signal before training started, or a second one
        stop.request(exc.signum)
        status = "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_run(run_id, status)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = result.checkpoint if result is not None and result.checkpoint else (last if last.exists() else None)
    return Outcome(result=result, run_id=run_id, status=status, run_dir=run_dir, checkpoint=checkpoint)


def stop_line(outcome: Outcome, stop: StopSignals, args: argparse.Namespace) -> str:
    """The one line printed on an interrupt: where training stopped and the command that resumes it."""
    from rdml.train import load_checkpoint
    from rdml.train.loop import PARTIAL

    why = signal_name(stop.signum) if stop.signum is not None else "an interrupt"
    run = f"; MLflow run {outcome.run_id} marked KILLED" if outcome.run_id else ""
    if outcome.checkpoint is None:
        return f"rdml train: stopped by {why} before a step finished; nothing to resume: run the same command again{run}"
    where = ""
    try:
        ckpt = load_checkpoint(outcome.checkpoint)
        part = ckpt.extra.get(PARTIAL)
        where = (f" in epoch {part['epoch']} after step {part['steps_done']} of {part['steps']}" if part
                 else f" after epoch {ckpt.epoch}")
    except Exception:  # noqa: BLE001 - the line must be printed whatever the file holds
        pass
    cmd = ["rdml", "train", "--resume", str(outcome.run_dir)]
    if args.no_ray:
        cmd.append("--no-ray")
    if args.address:
        cmd += ["--address", args.address]
    return (f"rdml train: stopped by {why}{where}; checkpoint {outcome.checkpoint}{run}; "
            f"resume with: {shlex.join(cmd)}")


# ---------------------------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.resume is not None:
        raise ConfigError("--seeds and --resume cannot be combined: resume each seed's run directory on its own "
                          "(rdml train --resume <run>-seed<k>)")
    ckpt = None
    if args.resume is not None:
        from rdml.train import load_checkpoint

        ckpt = load_checkpoint(args.resume)  # CheckpointError now, not inside a worker
    cfg = build_train_config(args, ckpt)
    if ckpt is not None:
        _check_resume(cfg, ckpt)
    _preflight(cfg)
    from rdml.jobenv import require_durable_dir

    require_durable_dir(run_dir_of(ckpt.path) if ckpt is not None else Path(cfg.train.output_dir), "its checkpoints",
                        "Point it at storage every node sees and that outlives the job: --set "
                        "train.output_dir=/shared/rdml-runs (docs/cluster.md).")
    if cfg.tracking.enabled:
        from rdml.tracking import check_reachable, resolved_uri

        check_reachable(resolved_uri(cfg.tracking))  # TrackingError before anything starts

    with StopSignals(notice=NOTICE) as stop:
        if args.seeds is not None:
            return _run_seeds(cfg, args, stop)
        outcome = train_one(cfg, stop=stop, resume=args.resume, ckpt=ckpt, no_ray=args.no_ray, address=args.address)
    if outcome.status != "FINISHED":
        print(stop_line(outcome, stop, args), file=sys.stderr, flush=True)
        return stop.exit_code
    result = outcome.result
    print_metrics(result.metrics, f"{cfg.name}: final metrics ({split_title(cfg)})")
    print(f"checkpoint: {result.checkpoint}")
    if outcome.run_id is not None:
        print(f"mlflow run: {outcome.run_id} (rdml ui to browse)")
    return 0


def _run_seeds(cfg: ExperimentConfig, args: argparse.Namespace, stop: StopSignals) -> int:
    """``--seeds N``: :func:`rdml.train.seeds.train_seeds` with this command's runs, then the summary."""
    from rdml.train.seeds import SeedRun, group_name, train_seeds

    group = group_name(cfg)
    tags = {"rdml.seed_group": uuid.uuid4().hex[:12]}
    parent = None
    if cfg.tracking.enabled:
        from rdml.tracking import start_run

        parent = start_run(cfg, run_name=group, tags={**tags, "rdml.kind": "seed-group", "rdml.seeds": str(args.seeds)})
    outcomes: list[Outcome] = []

    def one(sub: ExperimentConfig, run_tags: Any) -> SeedRun:
        outcome = train_one(sub, stop=stop, no_ray=args.no_ray, address=args.address, tags=dict(run_tags),
                            parent_run_id=parent)
        outcomes.append(outcome)
        return SeedRun(seed=sub.train.seed, config=sub, result=outcome.result, run_id=outcome.run_id,
                       status=outcome.status)

    status = "FAILED"
    try:
        grp = train_seeds(cfg, args.seeds, one, group=group, tags=tags)
        status = "FINISHED" if len(grp.finished) == args.seeds else "KILLED"
        summary = grp.summary()
        if parent is not None:
            from rdml.tracking import log_metrics

            flat = {}
            for key, iv in summary.items():
                name = key.removeprefix("eval/")
                flat.update({f"seeds/{name}/mean": iv.value, f"seeds/{name}/ci95_low": iv.low,
                             f"seeds/{name}/ci95_high": iv.high})
            log_metrics(parent, flat)
    finally:
        _close_run(parent, status)
    if status != "FINISHED":
        print(stop_line(outcomes[-1], stop, args), file=sys.stderr, flush=True)
        return stop.exit_code
    print_seed_summary(grp, summary, f"{cfg.name}: {args.seeds} seeds, final metrics ({split_title(cfg)})")
    if parent is not None:
        print(f"mlflow parent run: {parent} (rdml ui to browse)")
    return 0


def print_seed_summary(grp: Any, summary: dict[str, Any], title: str) -> None:
    """Mean and 95% t-interval over seeds of each final metric, each seed's value, then the checkpoints."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("95% interval (t)", justify="right")
    for run in grp.finished:
        table.add_column(f"seed {run.seed}", justify="right")
    for key, iv in summary.items():
        values = [f"{run.result.metrics[key]:.4f}" for run in grp.finished]
        table.add_row(key.removeprefix("eval/"), f"{iv.value:.4f}", f"[{iv.low:.4f}, {iv.high:.4f}]", *values)
    console.print(table)
    for run in grp.finished:
        mlflow = f"  (mlflow run {run.run_id})" if run.run_id else ""
        console.print(f"seed {run.seed}: checkpoint {run.result.checkpoint}{mlflow}", soft_wrap=True)
