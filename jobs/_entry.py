"""Shared by the ``jobs/*.py`` entrypoints: run one ``rdml`` sub-command inside a Ray job.

How rdml reaches the job (no install on the nodes needed, only the dependencies):

* ``--working-dir .`` uploads the checkout (minus the ``excludes`` of ``jobs/runtime_env.yaml``);
  Ray unpacks it on each node that runs a piece of the job and puts it first on the ``PYTHONPATH``
  of the job's workers and actors, so they import the uploaded ``rdml`` package.
* The driver runs ``python jobs/<cmd>.py``, whose ``sys.path[0]`` is ``jobs/``: the line below puts the
  working dir (the uploaded checkout) in front, so the driver imports the same uploaded ``rdml``,
  even on a node where another rdml is installed.

A job's driver runs on the cluster with ``RAY_ADDRESS`` set; rdml's commands join that cluster
(:mod:`rdml.distributed.connect`), so the entrypoints only forward their arguments, after a
pre-flight that refuses outputs in Ray's temporary working-dir cache (:mod:`rdml.jobenv`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# the job's working dir is the uploaded checkout: make `import rdml` work without an install
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FIX_OUTPUT = ("Point it at storage every node sees and that outlives the job, e.g. --set "
               "train.output_dir=/shared/rdml-runs (docs/cluster.md, 'Where outputs go').")


def preflight(command: str, argv: list[str]) -> None:
    """RdmlError now (not after an hour) if the command would write outputs into Ray's temporary dirs.

    ``rdml ensemble`` checks this itself; ``train``, ``tune`` and ``evaluate`` are checked here. The
    tracking store is checked by :func:`rdml.tracking.check_reachable` when the run starts; for
    ``evaluate --track`` (which starts its run after evaluating) it is checked here first.
    """
    from rdml.cli import build_parser
    from rdml.jobenv import require_durable_dir

    args = build_parser().parse_args([command, *argv])
    if command == "train":
        from rdml.commands.train import build_train_config

        cfg = build_train_config(args)
        target = Path(args.resume) if args.resume else Path(cfg.train.output_dir)
        require_durable_dir(target, "its checkpoints", _FIX_OUTPUT)
    elif command == "tune":
        from rdml.tune.space import load_space

        _, base = load_space(args.space, args.overrides)
        storage = Path(args.storage) if args.storage else Path(base.train.output_dir) / "tune"
        require_durable_dir(storage, "the search's trials and checkpoints",
                            "Pass --storage /shared/rdml-tune (or --set train.output_dir=/shared/rdml-runs).")
    elif command == "evaluate":
        if args.json_out:
            require_durable_dir(Path(args.json_out).parent, "its results (--json)",
                                "Pass --json /shared/eval/metrics.json, or --track to keep them in MLflow.")
        if args.track:
            paths = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
            for path in paths:
                _check_evaluate_store(path)


def _check_evaluate_store(checkpoint: str) -> None:
    """The store ``evaluate --track`` will log to: the evaluated run's config, else the environment."""
    from rdml.tracking import check_reachable, resolved_uri

    cfg = None
    try:
        from rdml.ensemble.load import find_ensemble

        found = find_ensemble(checkpoint)
        cfg = found.manifest.config if found is not None else None
    except ImportError:  # pragma: no cover - older rdml without ensemble evaluation
        pass
    if cfg is None:
        from rdml.train import load_checkpoint

        cfg = load_checkpoint(checkpoint).config
    if cfg.tracking.enabled:
        check_reachable(resolved_uri(cfg.tracking))


def run(command: str) -> int:
    from rdml.cli import main
    from rdml.errors import RdmlError

    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv:
        try:
            preflight(command, argv)
        except RdmlError as err:
            print(f"rdml {command}: error: {err}", file=sys.stderr)
            return 2
    return main([command, *argv])
