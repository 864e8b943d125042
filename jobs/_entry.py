"""Shared by the ``jobs/*.py`` entrypoints: run one ``rdml`` sub-command inside a Ray job.

A job's driver runs on the cluster with ``RAY_ADDRESS`` set; rdml's commands join that cluster
(:mod:`rdml.distributed.connect`), so the entrypoints only forward their arguments.
"""

from __future__ import annotations

import os
import sys

# the job's working dir is the uploaded checkout: make `import rdml` work without an install
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(command: str) -> int:
    from rdml.cli import main

    return main([command, *sys.argv[1:]])
