"""Search hardness schedules (and ICS weights, EAT modes) with Ray Tune.

The space is a YAML file (``tune_spaces/*.yaml``): base config, sampled params, ASHA, objectives.
Each trial trains with rdml's own loop and reports benign R@1 and a quick ERS every epoch; the
result is the Pareto front (printed, plotted, logged to the parent MLflow run with one YAML recipe
per front member, which ``rdml train --config`` accepts). ``--resume`` continues an interrupted
search (errored trials are retried).
"""

from __future__ import annotations

import argparse

from rdml.commands.options import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/hm_schedules.yaml")
    parser.add_argument("--samples", type=at_least(1, "trials to sample"), default=None,
                        help="trials to sample (default: the space's num_samples)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: ray.address or a local Ray)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override of the base config, e.g. --set train.epochs=2 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="resume the search in the experiment directory")
    parser.add_argument("--storage", default=None, help="where Tune keeps the search (default <train.output_dir>/tune)")
    parser.add_argument("--name", default=None, help="experiment name (default: the space's name)")


def run(args: argparse.Namespace) -> int:
    from rdml.tune.search import run_search

    result = run_search(args.space, overrides=args.overrides, num_samples=args.samples, address=args.address,
                        resume=args.resume, storage_path=args.storage, name=args.name)
    print(f"search directory: {result.experiment_dir}")
    print(f"Pareto-front recipes (rdml train --config FILE): {result.experiment_dir / 'pareto'}")
    if result.parent_run_id:
        print(f"mlflow parent run: {result.parent_run_id} (rdml ui to browse)")
    if result.errors:
        print(f"{result.errors} trial(s) errored; rerun with --resume to retry them")
    return 0
