"""Joining a Ray cluster, or starting a local one: the one place rdml calls ``ray.init``.

The address is, in order: the ``--address`` argument, ``ray.address`` in the config, ``RAY_ADDRESS``
in the environment (set by ``ray job submit`` inside a job, so jobs join the cluster they were
submitted to), else a new local Ray sized by ``ray.num_cpus`` / ``ray.num_gpus``.

**A local Ray listens on 127.0.0.1 only.** By default Ray binds its GCS, raylet, object manager, worker
and agent ports to the machine's network address or to every interface, so on a shared machine anyone
who can reach it can submit work to your Ray (and, with token authentication disabled as in CI, run
code as you). rdml's local Ray is a private tool of one command, so :func:`connect` starts it with the
node IP ``127.0.0.1``. In Ray 2.60 that takes two settings: ``_node_ip_address="127.0.0.1"``, and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (with the module constant it sets), without which Ray
"resolves" a loopback node IP to the machine's routable address (``resolve_ip_for_localhost``). The
dashboard (needed by Ray Train's state API) and the metrics agent then also listen on 127.0.0.1.
``tests/test_ray_loopback.py`` lists the listening sockets of every process of that Ray and checks them.

The local GCS gets a port chosen here, and its workers get ``RAY_ADDRESS`` pointing at it: Ray Train's
placement-group cleaner looks its cluster up through the state API, which without an address scans
the machine's processes and fails with "Found multiple active Ray instances" (a traceback in the
user's terminal) whenever someone else runs a Ray on the same machine. The driver's own environment
is left as it was, so a later :func:`connect` in the same process starts a fresh local Ray again.

**Real clusters** (an address is given) are joined as they are configured: rdml does not change how a
cluster listens. Secure one with Ray's token authentication (on by default for clusters started by
Ray 2.60 without ``RAY_AUTH_MODE``): on the head ``ray get-auth-token --generate`` (or set
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``), start every node with ``RAY_AUTH_MODE=token`` and the same
token, and give clients (``rdml train --address``, ``ray job submit``) the token through
``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``; keep the dashboard (``--dashboard-host``) on a private
network. ``RAY_AUTH_MODE=disabled`` is for a local Ray or CI only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from rdml.config import ExperimentConfig

LOOPBACK = "127.0.0.1"
#: read by Ray when it decides a node's IP: "0" means "not a cluster: use the loopback address"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def resolve_address(cfg: ExperimentConfig, address: str | None = None) -> str | None:
    """The cluster to join, or None for a new local Ray."""
    return address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (child processes started in it keep them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _start_local(ray, num_cpus: int | None, num_gpus: int | None, include_dashboard: bool,
                 log_to_driver: bool) -> None:
    """``ray.init`` of a new local Ray whose every port listens on 127.0.0.1 (see the module docstring)."""
    from ray._private import ray_constants

    port = _free_loopback_port()
    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # the driver read the env var at import: set its constant too
    try:
        with scoped_env(**{CLUSTER_ENV: "0", "RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{LOOPBACK}:{port}"}):
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                     dashboard_host=LOOPBACK, log_to_driver=log_to_driver, _node_ip_address=LOOPBACK)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was


def connect(
    cfg: ExperimentConfig,
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool = False,
) -> bool:
    """Initialise Ray unless this process already is connected; True when this call did it.

    ``num_cpus`` sizes a *local* Ray when the config does not (ignored when joining a cluster). The
    dashboard is off by default; Ray Train needs it (its state API), so the Train wrapper asks for it.
    A local Ray listens on 127.0.0.1 only; a cluster is joined as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = resolve_address(cfg, address)
    if target is None:
        _start_local(ray, cfg.ray.num_cpus or num_cpus, cfg.ray.num_gpus, include_dashboard, log_to_driver)
    else:
        ray.init(address=target, log_to_driver=log_to_driver)
    return True
