"""Joining a Ray cluster, or starting a local one: the one place rdml calls ``ray.init``.

The address is, in order: the ``--address`` argument, ``ray.address`` in the config, ``RAY_ADDRESS``
in the environment (set by ``ray job submit`` inside a job, so jobs join the cluster they were
submitted to), else a new local Ray sized by ``ray.num_cpus`` / ``ray.num_gpus``.
"""

from __future__ import annotations

import os

from rdml.config import ExperimentConfig


def resolve_address(cfg: ExperimentConfig, address: str | None = None) -> str | None:
    """The cluster to join, or None for a new local Ray."""
    return address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


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
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = resolve_address(cfg, address)
    if target is None:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or num_cpus, num_gpus=cfg.ray.num_gpus,
                 include_dashboard=include_dashboard, log_to_driver=log_to_driver)
    else:
        ray.init(address=target, log_to_driver=log_to_driver)
    return True
