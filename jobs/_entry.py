"""Shared by the ``jobs/*.py`` entrypoints: run one ``rdml`` sub-command inside a Ray job.

A job's driver runs on the cluster with ``RAY_ADDRESS`` set. rdml's commands start a *local* Ray
when no address is given, so the entrypoints add ``--address auto`` (join the job's cluster) to the
commands that use Ray unless the caller passed ``--address`` or ``--no-ray`` themselves.
"""

from __future__ import annotations

import os
import sys

# the job's working dir is the uploaded checkout: make `import rdml` work without an install
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USES_RAY = ("train", "ensemble", "tune")


def job_argv(command: str, argv: list[str]) -> list[str]:
    """The ``rdml`` argv for ``command`` with ``argv``, joining the job's cluster where needed."""
    args = [command, *argv]
    if command in USES_RAY and os.environ.get("RAY_ADDRESS") and not {"--address", "--no-ray"} & set(argv):
        args += ["--address", "auto"]
    return args


def run(command: str) -> int:
    from rdml.cli import main

    return main(job_argv(command, sys.argv[1:]))
