"""Where a command runs, and whether what it writes survives: the checks for Ray jobs.

Inside ``ray job submit --working-dir .`` the driver's current directory is Ray's *working-dir
cache* (``<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``). Ray
deletes that cache with the session and never copies it to other nodes, so relative output paths
(``train.output_dir=runs``, the default ``./mlflow.db`` store) would silently write a job's
checkpoints and runs into a temporary folder. The checks here turn that into a start-up error that
names the fix. Outside a Ray job they do nothing: a laptop's ``runs/`` is where the user wants it.

No Ray import: the job is recognised by the environment Ray's job supervisor gives the driver
(``RAY_JOB_CONFIG_JSON_ENV_VAR``) or by the working-dir cache path itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from rdml.errors import RdmlError, TrackingError

#: set by Ray's job supervisor in the environment of every job driver (ray 2.60)
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: the folder of a Ray session that holds unpacked runtime environments (working_dir, py_modules, ...)
RUNTIME_RESOURCES = "runtime_resources"


def in_ray_job() -> bool:
    """True in the driver of a Ray job (or any process whose CWD is a runtime-env cache)."""
    return bool(os.environ.get(JOB_ENV_VAR)) or temporary_location(Path.cwd()) is not None


def temporary_location(path: str | Path) -> str | None:
    """Why ``path`` is a temporary Ray location (None when it is not).

    Two kinds are recognised: anything below a ``runtime_resources`` folder of a session (the
    working-dir cache and the other runtime-env caches), and anything inside Ray's temp dir, found
    as a parent folder holding the ``session_latest`` link (``/tmp/ray`` or ``ray start --temp-dir``).
    """
    p = Path(path).expanduser().absolute()
    chain = [p, *p.parents]
    for i, parent in enumerate(chain):
        if parent.name == RUNTIME_RESOURCES and i > 0 and parent.parent.name.startswith("session_"):
            return f"inside Ray's runtime-env cache {parent} (the job's uploaded working dir, deleted with the session)"
    for parent in chain[1:]:
        if (parent / "session_latest").exists():
            return f"inside Ray's temporary directory {parent}"
    return None


def require_durable_dir(path: str | Path, what: str, fix: str) -> None:
    """In a Ray job, refuse to write ``what`` to a temporary Ray location (:class:`RdmlError` with ``fix``)."""
    if not in_ray_job():
        return
    reason = temporary_location(path)
    if reason is not None:
        raise RdmlError(
            f"this command runs inside a Ray job and would write {what} to {Path(path).absolute()}, {reason}: "
            f"nothing written there survives the job or reaches other nodes. {fix}"
        )


def require_durable_store(uri: str) -> None:
    """In a Ray job, refuse a local sqlite MLflow store inside a temporary Ray location (:class:`TrackingError`)."""
    if not uri.startswith("sqlite:///") or not in_ray_job():
        return
    db = Path(uri[len("sqlite:///"):])
    reason = temporary_location(db)
    if reason is not None:
        raise TrackingError(
            f"this command runs inside a Ray job and its MLflow store {uri} is {reason} (the default "
            "./mlflow.db of a job lands there): every run and artifact would be lost with the job. Point it "
            "at a tracking server reachable from every node: --set tracking.uri=http://MLFLOW_HOST:5000, or "
            "MLFLOW_TRACKING_URI in the env_vars of jobs/runtime_env.yaml (start one with "
            "`rdml ui --host 0.0.0.0 --allowed-hosts MLFLOW_HOST`, see docs/cluster.md)"
        )
