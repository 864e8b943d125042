"""Train one model: Ray Train with ``--workers N`` data-parallel workers (DDP), or in-process (--no-ray).

Everything that can be checked is checked before Ray starts (config, dataset presence, tracking
store), so a typo costs a second, not a cluster start. The driver creates the MLflow run; rank 0 logs
the curves, the final checkpoint, the plots and the model to it; the command ends with a table of the
final benign metrics on the zero-shot test classes.

Examples::

    rdml train --config digits                          # the demo: 8 epochs of c2f2 on digits
    rdml train --config digits --workers 2              # 2 DDP workers on a local Ray
    rdml train --config cub-hm-sglga-ics --address ray://head:10001
    rdml train --resume runs/digits-c2f2-20250101-120000 --epochs 12
"""

from __future__ import annotations

import argparse

from rdml.commands.common import add_config_arguments
from rdml.config import ExperimentConfig, build_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train DDP workers (train.workers)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default ray.address; none: local Ray)")
    parser.add_argument("--resume", default=None, metavar="PATH", help="checkpoint file or run directory to continue")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs (train.epochs)")
    parser.add_argument("--no-ray", action="store_true", help="train in this process without Ray (debugging)")


def build_train_config(args: argparse.Namespace) -> ExperimentConfig:
    """The run's config: --config (or, when resuming without one, the checkpoint's own), --set, flags."""
    extra = []
    if args.workers is not None:
        extra.append(f"train.workers={args.workers}")
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.resume is not None and args.config is None:
        from rdml.train import load_checkpoint

        base = load_checkpoint(args.resume).config.to_dict()
        return build_config(base, [*args.overrides, *extra])
    return load_config(args.config, [*args.overrides, *extra])


def _preflight(cfg: ExperimentConfig) -> None:
    """Fail fast (RdmlError) on missing data before any run or Ray is created."""
    from rdml.data import build_datasets

    build_datasets(cfg.data)


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """A rich table of the final benign metrics (eval/*) plus the last training loss."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(title)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key.startswith("eval/") or key in ("train/loss", "epoch"):
            table.add_row(key.removeprefix("eval/"), f"{value:.4f}" if key != "epoch" else f"{int(value)}")
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from rdml.train import default_run_dir, resolve_checkpoint

    cfg = build_train_config(args)
    if args.resume is not None:
        resolve_checkpoint(args.resume)  # CheckpointError now, not inside a worker
    _preflight(cfg)

    run_id = None
    if cfg.tracking.enabled:
        from rdml.tracking import start_run

        run_id = start_run(cfg)  # TrackingError if the store does not answer
    status = "FAILED"
    try:
        if args.no_ray:
            from rdml.distributed.train_ray import absolute_paths
            from rdml.train import fit

            cfg = absolute_paths(cfg)
            callbacks = []
            if run_id is not None:
                from rdml.tracking import RunLogger

                callbacks.append(RunLogger(run_id, cfg.tracking))
            run_dir = None if args.resume is not None else default_run_dir(cfg)
            result = fit(cfg, callbacks=callbacks, resume=args.resume, run_dir=run_dir)
        else:
            from rdml.distributed.train_ray import train_with_ray

            result = train_with_ray(cfg, resume=args.resume, run_id=run_id, address=args.address)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_id is not None:
            from rdml.tracking import end_run

            end_run(run_id, status)
    print_metrics(result.metrics, f"{cfg.name}: final metrics (zero-shot test classes)")
    print(f"checkpoint: {result.checkpoint}")
    if run_id is not None:
        print(f"mlflow run: {run_id} (rdml ui to browse)")
    return 0

