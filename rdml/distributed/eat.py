"""EAT on Ray: one actor per member, in a placement group, exchanging records through the object store.

Roles:

* :class:`MemberActor` wraps one :class:`rdml.ensemble.member.Member` (threads and device set
  inside the actor: CUDA when torch sees one, else CPU, also on logical GPUs).
* :class:`RayEnsemble` is the coordinator's backend for :func:`rdml.ensemble.trainer.train_ensemble`:
  it creates the placement group and actors and runs one ensemble step per call.

The step protocol is the exchange of :mod:`rdml.ensemble.exchange` and nothing else; this module
does not know the self-transfer modes. Member k's ``step(s, refs)`` fetches the other members'
records from the object store (``refs`` are their ObjectRefs, wrapped in a list so that Ray does not
resolve them on the way), takes its step, ``ray.put``s the record it publishes for step s + 1 and
returns ``(metrics, [ref])``. The driver keeps only the references and hands member k the references
of all j != k at the next step: it never holds a record. Before the first step, and after a restore,
``publish()`` gives the members' current records. The exchange is at step boundaries only, so no
member ever waits for another inside a step: the driver's gather of the step results is the only
rendezvous, and it cannot leave a member blocked when another one dies.

Faults: actors are created with ``max_restarts=ensemble.max_restarts`` and ``max_task_retries=0``
(a retried task on a freshly restarted member would run on the wrong state). A restarted actor
refuses every call but ``load_state``/``ping``/``info`` until it is restored (:class:`MemberReset`), so
no step runs on a freshly built member. When a step loses a member (its own call fails, or another
member cannot fetch its record because its owner died), the coordinator waits until the restarted
actor answers and raises :class:`~rdml.ensemble.trainer.MemberFailure`; the trainer then restores
every member from the last checkpoint (records included) and replays.

The strategy class of the configured mode is sent to every actor, so a mode registered only in the
driver (a plugin, a test) runs on Ray unchanged.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from rdml.config import ExperimentConfig, build_config
from rdml.distributed.connect import connect
from rdml.ensemble.member import Member, ensemble_steps_per_epoch, pass_length
from rdml.ensemble.parts import member_subsets
from rdml.ensemble.trainer import MemberFailure
from rdml.ensemble.transfer import SELF_TRANSFER, get_transfer
from rdml.ensemble.validate import check_ensemble
from rdml.errors import ConfigError

_ACTOR_CLASSES: dict[str, Any] = {}


class MemberReset(RuntimeError):
    """A restarted member actor was asked to work before its state was restored from a checkpoint."""


def _set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))
    try:
        import faiss

        faiss.omp_set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass


class _MemberActorImpl:
    """The body of :class:`MemberActor` (kept importable without Ray for readability)."""

    def __init__(self, cfg: dict[str, Any], member_id: int, indices: np.ndarray, steps_per_epoch: int,
                 threads: int, transfer: type) -> None:
        import ray

        from rdml.data import build_datasets
        from rdml.train import resolve_device

        os.environ["TQDM_DISABLE"] = "1"  # an actor's output goes to Ray's log files: no progress bars there
        _set_threads(threads)
        SELF_TRANSFER.setdefault(transfer.name, transfer)  # a mode registered in the driver only (plugin, test)
        self.cfg: ExperimentConfig = build_config(cfg)
        self.id = int(member_id)
        self.device = resolve_device(self.cfg)
        train_set = build_datasets(self.cfg.data).train
        self.member = Member(self.cfg, member_id, train_set, indices, self.device, steps_per_epoch=steps_per_epoch,
                             transfer=transfer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.needs_restore = self.restarted
        self.timing = {"step": 0.0, "put": 0.0, "get": 0.0, "steps": 0, "bytes": 0}

    def _ready(self) -> None:
        if self.needs_restore:
            raise MemberReset(f"member {self.id} was restarted and has not been restored from a checkpoint yet")

    # -- introspection -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "member": self.id, "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device),
            "threads": torch.get_num_threads(), "restarted": self.restarted,
            "stats_reads": self.member.stats_reads, "steps": self.member.global_step,
        }

    def get_timing(self) -> dict[str, float]:
        return dict(self.timing)

    def reset_timing(self) -> None:
        self.timing = dict.fromkeys(self.timing, 0.0)

    # -- the exchange ------------------------------------------------------------------------------
    def _publish(self) -> list[Any]:
        import ray

        record = self.member.publish()
        t0 = time.perf_counter()
        ref = ray.put(record)
        self.timing["put"] += time.perf_counter() - t0
        self.timing["bytes"] += 0 if record is None else record.nbytes
        return [ref]

    def publish(self) -> list[Any]:
        """``[ref]`` of the record this member shares before its next step."""
        self._ready()
        return self._publish()

    def step(self, step: int, refs: list[Any]) -> tuple[dict[str, float], list[Any]]:
        """Fetch the others' records, take the step, publish the next record: ``(metrics, [ref])``."""
        import ray

        self._ready()
        t0 = time.perf_counter()
        records = ray.get(list(refs))
        t1 = time.perf_counter()
        self.timing["get"] += t1 - t0
        metrics = self.member.step(step, records)
        self.timing["step"] += time.perf_counter() - t1
        self.timing["steps"] += 1
        return metrics, self._publish()

    def robustness(self, profiles: list[str]) -> dict[str, float]:
        """This member's robustness under ``profiles`` (run in the actor, in parallel with the others)."""
        from rdml.data import build_datasets
        from rdml.ensemble.summary import robustness_of
        from rdml.eval.protocol import evaluation_sets

        self._ready()
        test, gallery = evaluation_sets(build_datasets(self.cfg.data))
        return robustness_of({"m": self.member.model}, test, self.cfg, profiles, device=str(self.device),
                             gallery=gallery)["m"]

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        self._ready()
        return self.member.state_dict()

    def load_state(self, state: dict[str, Any]) -> None:
        self.member.load_state_dict(state)
        self.needs_restore = False

    def model_state(self) -> dict[str, torch.Tensor]:
        self._ready()
        return self.member.model_state()

    def ping(self) -> int:
        return self.id


def _remote_classes() -> Any:
    import ray

    if not _ACTOR_CLASSES:
        _ACTOR_CLASSES["member"] = ray.remote(_MemberActorImpl)
    return _ACTOR_CLASSES["member"]


def ensure_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to the cluster (see :mod:`rdml.distributed.connect`) or start a local Ray; True if started here.

    A local Ray gets at least ``members * cpus_per_member`` logical CPUs, plus the final evaluation's
    attack workers (``eval.workers * eval.worker_threads``); members share the cores when there are
    fewer; each actor runs ``cpus_per_member`` threads.
    """
    need = math.ceil(cfg.ensemble.members * cfg.ensemble.cpus_per_member) + cfg.eval.workers * cfg.eval.worker_threads
    return connect(cfg, address, num_cpus=max(os.cpu_count() or 1, need))


def shutdown_ray() -> None:
    """Disconnect from (or stop the local) Ray started by :func:`ensure_ray`."""
    import ray

    ray.shutdown()


def check_capacity(bundle: dict[str, float], count: int) -> None:
    """ConfigError at once when the cluster can never host ``count`` placement bundles of ``bundle``.

    With an autoscaler the limit is the most its config can ever provide (what Ray Train checks before
    its own placement group); the placement group then waits for the nodes it adds. Without one (a
    fixed cluster, e.g. ``ray start --head`` on a 2-CPU machine) the limit is what the nodes have now:
    waiting would only end in the placement timeout minutes later.
    """
    import ray

    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()  # None: no autoscaler config
    except Exception:  # noqa: BLE001 - a private API: without it, judge by the nodes present
        ceiling = None
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    totals = dict(ceiling) if ceiling else {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    short = {k: (v * count, totals.get(k, 0.0)) for k, v in bundle.items() if v * count > totals.get(k, 0.0) + 1e-9}
    if not ceiling:
        largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in bundle}
        short.update({f"{k} on one node": (v, largest[k]) for k, v in bundle.items() if v > largest[k] + 1e-9})
    if not short:
        return
    need = ", ".join(f"{k} {want:g} (the cluster has {have:g})" for k, (want, have) in short.items())
    scope = "its autoscaler can ever provide" if ceiling else "its nodes have (no autoscaler)"
    share = math.floor(totals.get("CPU", 0.0) / count * 100) / 100  # rounded down: the bundles must fit
    fit = f"--set ensemble.cpus_per_member={share:g} (members share the cores), " if share > 0 else ""
    raise ConfigError(
        f"the Ray cluster cannot host {count} ensemble members with {bundle} each: they need {need}, more than "
        f"{scope}. Lower --members, or {fit}or add nodes"
    )


class RayEnsemble:
    """Ray backend of :func:`rdml.ensemble.trainer.train_ensemble` (see the module doc)."""

    name = "ray"

    def __init__(self, cfg: ExperimentConfig, train_set, *, ready_timeout: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rdml.distributed.train_ray import absolute_paths

        check_ensemble(cfg)
        self.cfg = absolute_paths(cfg)
        e = self.cfg.ensemble
        self.members = e.members
        transfer = get_transfer(e.self_transfer)
        subsets = member_subsets(train_set.labels, e.members, e.parts, e.split, seed=self.cfg.train.seed)
        self._spe = ensemble_steps_per_epoch(
            self.cfg, [pass_length(self.cfg, train_set, s, k) for k, s in enumerate(subsets)])
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        use_gpu = cluster_gpus >= 1 and self.cfg.train.device != "cpu"
        self.gpus_per_member = min(1.0, cluster_gpus / e.members) if use_gpu else 0.0
        bundle: dict[str, float] = {"CPU": e.cpus_per_member}
        if self.gpus_per_member > 0:
            bundle["GPU"] = self.gpus_per_member
        check_capacity(bundle, e.members)  # ConfigError now when the cluster can never host them
        self.pg = placement_group([dict(bundle) for _ in range(e.members)], strategy=e.placement)
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise ConfigError(
                f"the Ray cluster cannot host {e.members} members with {bundle} each ({e.placement}) within "
                f"{ready_timeout:.0f}s; cluster resources: {ray.cluster_resources()}. Lower ensemble.members or "
                "ensemble.cpus_per_member, use placement PACK, or add nodes"
            )
        member_cls = _remote_classes()
        threads = self.cfg.train.threads or max(1, int(e.cpus_per_member))
        cfg_dict = self.cfg.to_dict()
        self.actors = [
            member_cls.options(
                num_cpus=e.cpus_per_member,
                num_gpus=self.gpus_per_member,
                max_restarts=e.max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=k
                ),
            ).remote(cfg_dict, k, subsets[k], self._spe, threads, transfer)
            for k in range(e.members)
        ]
        self._refs: list[Any] | None = None  # ObjectRefs of the records the members publish for the next step
        self.wall = 0.0
        ray.get([a.ping.remote() for a in self.actors])  # every actor built (a constructor error surfaces here)

    # -- backend protocol --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self._spe

    def step(self, step: int) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        if self._refs is None:
            self._refs = [w[0] for w in self._collect([a.publish.remote() for a in self.actors])]
        refs = self._refs
        out = self._collect([a.step.remote(step, [r for j, r in enumerate(refs) if j != k])
                             for k, a in enumerate(self.actors)])
        self._refs = [o[1][0] for o in out]  # references only: the records stay in the object store
        self.wall += time.perf_counter() - t0
        return [o[0] for o in out]

    def _collect(self, futures: list[Any]) -> list[Any]:
        """Results in order; on a lost member wait for its restart and raise MemberFailure."""
        import ray
        from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

        index = {f: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        pending = list(futures)
        lost: list[BaseException] = []
        other: list[BaseException] = []
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for f in ready:
                try:
                    results[index[f]] = ray.get(f)
                except (RayActorError, ActorUnavailableError, ObjectLostError, MemberReset) as exc:
                    lost.append(exc)  # a member died, or another could not fetch the record of one that died
                except Exception as exc:  # noqa: BLE001 - re-raised below unless caused by a lost member
                    other.append(exc)
        if lost:
            self._refs = None
            self.wait_alive()
            raise MemberFailure(f"{len(lost)} member call(s) lost during the step: {lost[0]}")
        if other:
            raise other[0]
        return results

    def wait_alive(self, timeout: float = 120.0) -> None:
        """Block until every actor answers (restarted actors included)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.time() + timeout
        for a in self.actors:
            while True:
                try:
                    ray.get(a.ping.remote(), timeout=30)
                    break
                except (RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)

    def states(self) -> list[dict[str, Any]]:
        return self._collect([a.state.remote() for a in self.actors])

    def load_states(self, states: list[dict[str, Any]]) -> None:
        import ray

        self._refs = None  # the restored members publish again
        self._collect([a.load_state.remote(ray.put(s)) for a, s in zip(self.actors, states, strict=True)])

    def model_states(self) -> list[dict[str, torch.Tensor]]:
        return self._collect([a.model_state.remote() for a in self.actors])

    def member_robustness(self, profiles: list[str]):
        """Start every member's robustness evaluation in its actor; returns ``wait() -> [rows]``."""
        import ray

        futures = [a.robustness.remote(list(profiles)) for a in self.actors]
        return lambda: ray.get(futures)

    def info(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    @property
    def timing(self) -> dict[str, float]:
        """Per-member timings summed over members (step compute, put, get in seconds; steps; bytes published),
        plus ``wall``: the driver's seconds per step call, summed."""
        import ray

        rows = ray.get([a.get_timing.remote() for a in self.actors])
        return {**{k: float(sum(r[k] for r in rows)) for k in rows[0]}, "wall": self.wall}

    def reset_timing(self) -> None:
        import ray

        self.wall = 0.0
        ray.get([a.reset_timing.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)
