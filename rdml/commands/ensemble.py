"""Train an EAT ensemble: one Ray actor per member, exchanging robustness statistics (self-transfer).

Examples::

    rdml ensemble --config digits-eat                   # 3 members on a local Ray, CPU
    rdml ensemble --config digits-eat --members 5 --set ensemble.self_transfer=cross_member
    rdml ensemble --address ray://head:10001 --config cub-eat
    rdml ensemble --resume runs/digits-eat-20250101-120000   # continue from its manifest.json

The run ends with a table of every member and of the combined embedding: clean metrics, the quick
ERS attacks and the clustering attacks (``eval.profile`` overrides the profiles, comma-separated).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rdml.commands.common import add_config_arguments
from rdml.config import build_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--members", "-m", type=int, default=None, help="ensemble size M (ensemble.members)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, else local)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="run directory holding manifest.json")
    parser.add_argument("--run-dir", default=None, help="where checkpoints go (default train.output_dir/<name>-<time>)")
    parser.add_argument("--no-ray", action="store_true", help="step the members in turn in this process")
    parser.add_argument("--no-attacks", action="store_true", help="skip the final robustness evaluation")


def build_ensemble_config(args: argparse.Namespace):
    """The config: the resumed run's own config, else --config; then --set and --members."""
    extra = [f"ensemble.members={args.members}"] if args.members else []
    if args.resume:
        from rdml.ensemble import load_manifest

        manifest = load_manifest(args.resume)
        return build_config(manifest.config.to_dict(), [*args.overrides, *extra]), manifest
    return load_config(args.config, [*args.overrides, *extra]), None


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble, train_ensemble
    from rdml.ensemble.report import default_profiles, print_table, robustness_of, table_rows
    from rdml.train import default_run_dir, resolve_device

    cfg, manifest = build_ensemble_config(args)
    splits = build_datasets(cfg.data)  # DataError now, before Ray or MLflow start
    run_id = None
    if cfg.tracking.enabled:
        from rdml.tracking import start_run

        tags = {"rdml.kind": "eat-ensemble"}
        if manifest is not None and manifest.mlflow_run_id:
            tags["rdml.resumed_from"] = manifest.mlflow_run_id
        run_id = start_run(cfg, tags=tags)

    def log(metrics: dict[str, float], step: int) -> None:
        if run_id is not None:
            from rdml.tracking import log_metrics

            log_metrics(run_id, metrics, step, tracking=cfg.tracking)

    run_dir = Path(manifest.run_dir if manifest else (args.run_dir or default_run_dir(cfg))).resolve()
    status, backend, started = "FAILED", None, False
    try:
        if args.no_ray:
            import torch

            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            backend = LocalEnsemble(cfg, splits.train, resolve_device(cfg))
        else:
            from rdml.distributed.eat import RayEnsemble, ensure_ray

            started = ensure_ray(cfg, args.address)
            backend = RayEnsemble(cfg, splits.train)
        print(f"rdml ensemble: {cfg.ensemble.members} members ({backend.name}), self_transfer="
              f"{cfg.ensemble.self_transfer}, checkpoints in {run_dir}")
        result = train_ensemble(cfg, backend, splits, run_dir, run_id=run_id, resume=manifest, log=log)
        names = [f"member_{k}" for k in range(cfg.ensemble.members)] + ["ensemble"]
        robust: dict[str, dict[str, float]] = {}
        if not args.no_attacks:
            import time

            import torch

            t0 = time.perf_counter()
            profiles = default_profiles(cfg, splits.test.image_size)
            wait = backend.member_robustness(profiles)  # members attack themselves in their actors...
            threads = torch.get_num_threads()
            if backend.name == "ray":  # ...while the driver attacks the ensemble: no OpenMP oversubscription
                torch.set_num_threads(cfg.train.threads or 1)
            try:
                robust = robustness_of({"ensemble": result.model}, splits.test, cfg, profiles)
            finally:
                torch.set_num_threads(threads)
            robust.update({f"member_{k}": row for k, row in enumerate(wait())})
            print(f"robustness ({', '.join(profiles)}) of {len(robust)} models: {time.perf_counter() - t0:.0f} s")
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
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if backend is not None:
            backend.shutdown()
        if started:
            import ray

            ray.shutdown()
        if run_id is not None:
            from rdml.tracking import end_run

            end_run(run_id, status, tracking=cfg.tracking)
    return 0
