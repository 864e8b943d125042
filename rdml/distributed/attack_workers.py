"""Attack evaluation on Ray actors: the executor of :mod:`rdml.eval.shards`.

``RayAttackWorkers(workers=N)`` starts N actors, one GPU each where the cluster has GPUs (else
``threads`` CPUs each, running ``threads`` torch threads). For each evaluation the driver puts the
:class:`~rdml.eval.shards.AttackPlan` (the model, the data set and the gallery embedded once, on the
CPU) into the object store once; every actor loads it once, moves it to its device, and then takes
tasks (query shards and clustering attacks) from an :class:`ray.util.ActorPool` as it frees up. The
results come back in task order and are merged by the driver, so the numbers are those of the
single-process path (:mod:`rdml.eval.shards` says why, bit for bit).

Used by ``rdml evaluate --workers N``, the ensemble's final evaluation (``eval.workers``) and Tune
trials (``robustness.workers`` of a search space).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rdml.errors import ConfigError, RdmlError

_ACTOR_CLASSES: dict[str, Any] = {}


class _AttackWorkerImpl:
    """One attack worker: holds the current evaluation's plan on its device and runs tasks on it."""

    def __init__(self, threads: int) -> None:
        import ray

        torch.set_num_threads(threads)
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        self.plan: Any = None

    def info(self) -> dict[str, Any]:
        return {"device": str(self.device), "threads": torch.get_num_threads(), "pid": os.getpid()}

    def load(self, plan: Any) -> bool:
        self.plan = plan.to(self.device)
        return True

    def run(self, fn: Any, task: Any) -> Any:
        return fn(self.plan, task, self.device)


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error (the original exception), not Ray's whole report."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _worker_class() -> Any:
    import ray

    if not _ACTOR_CLASSES:
        _ACTOR_CLASSES["worker"] = ray.remote(_AttackWorkerImpl)
    return _ACTOR_CLASSES["worker"]


class RayAttackWorkers:
    """An executor (:class:`rdml.eval.shards.ShardExecutor`) of N Ray actors; Ray must be connected.

    ``gpus``: None uses one GPU per worker when the cluster has at least one GPU per worker, else none.
    Close it (or use it as a context manager) to release the actors.
    """

    def __init__(self, workers: int, *, threads: int = 1, gpus: bool | None = None, ready_timeout: float = 120.0):
        import ray

        if workers < 1:
            raise ConfigError(f"attack workers: {workers}; give at least 1")
        if not ray.is_initialized():
            raise RdmlError("attack workers need a connected Ray (rdml.distributed.connect)")
        total = ray.cluster_resources()
        use_gpu = total.get("GPU", 0) >= workers if gpus is None else gpus
        need = {"CPU": workers * threads, **({"GPU": workers} if use_gpu else {})}
        short = [f"{need[k]:g} {k} (the cluster has {total.get(k, 0):g})" for k in need if total.get(k, 0) < need[k]]
        if short:
            raise ConfigError(f"{workers} attack workers need {', '.join(short)}: lower --workers (or --threads), or "
                              "add nodes")
        cls = _worker_class()
        self.workers = workers
        self.actors = [cls.options(num_cpus=threads, num_gpus=1 if use_gpu else 0).remote(threads)
                       for _ in range(workers)]
        try:
            self.info = ray.get([a.info.remote() for a in self.actors], timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ConfigError(f"{workers} attack workers did not start within {ready_timeout:.0f} s (resources "
                              f"{need}; cluster {total}): lower --workers or add nodes") from None

    def map(self, fn: Any, plan: Any, tasks: Sequence[Any]) -> list[Any]:
        import ray
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        try:
            ref = ray.put(plan.to("cpu"))
        except (pickle.PicklingError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"the model cannot be sent to Ray attack workers ({type(exc).__name__}: {exc}); "
                              "evaluate it without --workers (in one process)") from None
        try:
            ray.get([a.load.remote(ref) for a in self.actors])
        except ray.exceptions.RayError as exc:
            raise ConfigError(f"the attack workers could not load the model and data ({_cause(exc)}): their code "
                              "must be importable on the workers (install the package there, or give Ray a "
                              "runtime_env); or evaluate without --workers") from None
        try:
            pool = ActorPool(self.actors)
            results = pool.map(lambda actor, task: actor.run.remote(fn, task), list(tasks))
            return list(tqdm(results, total=len(tasks), desc=f"attack tasks on {self.workers} workers",
                             disable=len(tasks) < 2, leave=False))
        except ray.exceptions.RayActorError as exc:
            raise RdmlError(f"an attack worker died during the evaluation ({_cause(exc)}); nothing was written. "
                            "Rerun with fewer --workers, or without --workers") from None
        finally:
            del ref

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayAttackWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def attack_workers(workers: int, **kwargs: Any) -> Iterator[RayAttackWorkers | None]:
    """``workers`` attack workers for a block, released after it; None for 0 (the block attacks in its process)."""
    if not workers:
        yield None
        return
    with RayAttackWorkers(workers, **kwargs) as pool:
        yield pool
