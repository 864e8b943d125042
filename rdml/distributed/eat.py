"""EAT on Ray: one actor per member, in a placement group, exchanging statistics via the object store.

Roles:

* :class:`MemberActor` wraps one :class:`rdml.ensemble.member.Member` (threads and device set
  inside the actor: CUDA when torch sees one, else CPU, also on logical GPUs).
* :class:`Rendezvous` is the coordinator's exchange point for ``ensemble_gradient``: at every PGD
  iteration each member ``ray.put``s its input-gradient record and posts the *reference* (wrapped in
  a list, so nothing is resolved on the way); when all M have posted, every member receives all M
  references and fetches the records from the object store. Only references pass through it.
* :class:`RayEnsemble` is the coordinator's backend for :func:`rdml.ensemble.trainer.train_ensemble`:
  it creates the placement group and actors and runs one ensemble step per call.

Step protocols (eat-panum A.5-c):

* ``none``: each member draws, crafts white-box, updates. No statistics are exchanged.
* ``cross_member``: phase 1, every member crafts and returns ``[ray.put(record)]``; the driver
  collects the (tiny) lists of references and hands member k the references of all j != k; phase 2,
  member k fetches those records from the object store and updates. The driver never holds a record.
* ``ensemble_gradient`` (reading A): every member draws its batch and all-gathers the batches
  (references through the rendezvous); each member then runs the one PGD engine on the concatenated
  batches with an :class:`~rdml.ensemble.objectives.ExchangedObjective`: per PGD iteration it
  computes its own input gradient on all M batches and all-gathers the float16 records, so every
  member holds the identical ensemble-mean gradient and the identical adversarial batches; member k
  adopts batch k and updates. One driver call per step; T+1 exchanges inside it.

Faults: actors are created with ``max_restarts=ensemble.max_restarts`` and ``max_task_retries=0``
(a retried task on a freshly restarted member would run on the wrong state). When a step loses a
member, the coordinator aborts the step's rendezvous (so no member waits forever), waits until the
restarted actor answers, and raises :class:`~rdml.ensemble.trainer.MemberFailure`; the trainer then
restores every member from the last checkpoint and replays.
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
from rdml.ensemble.member import Member, step_generator
from rdml.ensemble.objectives import ExchangedObjective
from rdml.ensemble.parts import member_subsets
from rdml.ensemble.stats import RobustnessStats, make_stats
from rdml.ensemble.trainer import MemberFailure
from rdml.errors import ConfigError

_ACTOR_CLASSES: dict[str, Any] = {}


def _set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))
    try:
        import faiss

        faiss.omp_set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass


class _MemberActorImpl:
    """The body of :class:`MemberActor` (kept importable without Ray for readability)."""

    def __init__(self, cfg: dict[str, Any], member_id: int, indices: np.ndarray, rendezvous: Any,
                 threads: int) -> None:
        import ray

        from rdml.data import build_datasets
        from rdml.train import resolve_device

        _set_threads(threads)
        self.cfg: ExperimentConfig = build_config(cfg)
        self.id = int(member_id)
        self.rendezvous = rendezvous
        self.device = resolve_device(self.cfg)
        train_set = build_datasets(self.cfg.data).train
        self.member = Member(self.cfg, member_id, train_set, indices, self.device)
        self.generation = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.timing = {"step": 0.0, "put": 0.0, "get": 0.0, "wait": 0.0, "steps": 0, "bytes": 0}

    # -- introspection -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "member": self.id, "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device),
            "threads": torch.get_num_threads(), "restarted": self.restarted,
            "stats_reads": self.member.stats_reads, "steps": self.member.steps,
        }

    def steps_per_epoch(self) -> int:
        return self.member.steps_per_epoch()

    def get_timing(self) -> dict[str, float]:
        return dict(self.timing)

    def reset_timing(self) -> None:
        self.timing = dict.fromkeys(self.timing, 0.0)

    # -- exchange helpers --------------------------------------------------------------------------
    def _put(self, obj: Any) -> Any:
        import ray

        t0 = time.perf_counter()
        ref = ray.put(obj)
        self.timing["put"] += time.perf_counter() - t0
        return ref

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        t0 = time.perf_counter()
        out = ray.get(list(refs))
        self.timing["get"] += time.perf_counter() - t0
        return out

    def _all_gather(self, key: str, ref: Any) -> list[Any]:
        import ray

        t0 = time.perf_counter()
        wrapped = ray.get(self.rendezvous.all_gather.remote(self.generation, key, self.id, [ref]))
        self.timing["wait"] += time.perf_counter() - t0
        if wrapped is None:
            raise RuntimeError(f"member {self.id}: exchange {key} aborted by the coordinator (a member failed)")
        return [w[0] for w in wrapped]

    # -- step protocols ----------------------------------------------------------------------------
    def step_none(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.member.draw()
        self.member.craft_own(step)
        metrics = self.member.update([])
        self._count_step(t0)
        return metrics

    def craft(self, step: int) -> list[Any]:
        """Phase 1 of ``cross_member``: craft, publish the record; returns ``[ref]``."""
        self._t0 = time.perf_counter()
        self.member.draw()
        record = self.member.craft_own(step)
        ref = self._put(record)
        self.timing["bytes"] += record.nbytes
        return [ref]

    def update(self, step: int, refs: list[Any]) -> dict[str, float]:
        """Phase 2 of ``cross_member``: fetch the other members' records from the object store, update."""
        records: list[RobustnessStats] = self._get(refs)
        metrics = self.member.update(records)
        self._count_step(getattr(self, "_t0", time.perf_counter()))
        return metrics

    def step_ensemble_gradient(self, step: int, generation: int) -> dict[str, float]:
        """One reading-A step (see the module doc)."""
        from rdml.attacks.pgd import frozen_eval, pgd

        t0 = time.perf_counter()
        self.generation = generation
        m = self.member
        x, y, ids = m.draw()
        members = self.cfg.ensemble.members
        if members > 1:
            refs = self._all_gather(f"{step}/batch", self._put((x.cpu(), y.cpu(), ids)))
            batches = self._get(refs)
            batches = [(bx.to(self.device), by.to(self.device), bids) for bx, by, bids in batches]
        else:
            batches = [(x, y, ids)]
        x_cat = torch.cat([b[0] for b in batches])
        labels = [b[1] for b in batches]
        sizes = [len(b[1]) for b in batches]
        all_ids = torch.cat([b[2] for b in batches])
        all_labels = torch.cat(labels)
        counter = {"t": 0}

        def gather(losses: torch.Tensor, grad: torch.Tensor | None) -> list[tuple[torch.Tensor, Any]]:
            counter["t"] += 1
            if members == 1:
                return [(losses, grad)]
            zeros = torch.zeros_like(losses)
            record = make_stats(self.id, step, all_ids, all_labels, losses, zeros, zeros,
                                torch.zeros_like(all_ids), input_grad=grad, pgd_iter=counter["t"])
            self.timing["bytes"] += record.nbytes
            refs = self._all_gather(f"{step}/grad/{counter['t']}", self._put(record))
            out = []
            for r in self._get(refs):
                g = None if r.input_grad is None else torch.from_numpy(np.array(r.input_grad, dtype=np.float32))
                out.append((torch.from_numpy(np.array(r.adv_loss, dtype=np.float32)).to(self.device),
                            None if g is None else g.to(self.device)))
            return out

        objective = ExchangedObjective(m.own_objective(labels, sizes), gather)
        with frozen_eval(m.model, m.loss):
            result = pgd(objective, x_cat, m.budget, generator=step_generator(self.cfg, step))
        start = sum(sizes[: self.id])
        n = sizes[self.id]
        m.set_adversarial(result.x_adv[start : start + n], result.iterations[start : start + n], step)
        metrics = m.update([])
        self._count_step(t0)
        return metrics

    def _count_step(self, t0: float) -> None:
        self.timing["step"] += time.perf_counter() - t0
        self.timing["steps"] += 1

    def robustness(self, profiles: list[str]) -> dict[str, float]:
        """This member's robustness under ``profiles`` (run in the actor, in parallel with the others)."""
        from rdml.data import build_datasets
        from rdml.ensemble.report import robustness_of

        test = build_datasets(self.cfg.data).test
        model = self.member.model
        return robustness_of({"m": model}, test, self.cfg, profiles, device=str(self.device))["m"]

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.member.state_dict()

    def load_state(self, state: dict[str, Any]) -> None:
        self.member.load_state_dict(state)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.member.model_state()

    def ping(self) -> int:
        return self.id


class _RendezvousImpl:
    """All-gather of small values (lists holding ObjectRefs), keyed by (generation, key)."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.rounds: dict[tuple[int, str], dict[str, Any]] = {}
        self.aborted: set[int] = set()

    async def all_gather(self, generation: int, key: str, rank: int, value: Any) -> list[Any] | None:
        import asyncio

        if generation in self.aborted:
            return None
        slot = self.rounds.get((generation, key))
        if slot is None:
            slot = {"values": [None] * self.members, "posted": 0, "left": self.members, "event": asyncio.Event()}
            self.rounds[(generation, key)] = slot
        slot["values"][rank] = value
        slot["posted"] += 1
        if slot["posted"] == self.members:
            slot["event"].set()
        await slot["event"].wait()
        if generation in self.aborted:
            return None
        out = list(slot["values"])
        slot["left"] -= 1
        if slot["left"] == 0:
            self.rounds.pop((generation, key), None)
        return out

    async def abort(self, generation: int) -> None:
        self.aborted.add(generation)
        for (gen, _), slot in list(self.rounds.items()):
            if gen == generation:
                slot["event"].set()
        self.rounds = {k: v for k, v in self.rounds.items() if k[0] != generation}


def _remote_classes() -> tuple[Any, Any]:
    import ray

    if not _ACTOR_CLASSES:
        _ACTOR_CLASSES["member"] = ray.remote(_MemberActorImpl)
        _ACTOR_CLASSES["rendezvous"] = ray.remote(_RendezvousImpl)
    return _ACTOR_CLASSES["member"], _ACTOR_CLASSES["rendezvous"]


def ensure_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to the cluster (see :mod:`rdml.distributed.connect`) or start a local Ray; True if started here.

    A local Ray gets at least ``members * cpus_per_member`` logical CPUs (members share the cores
    when there are fewer; each actor runs ``cpus_per_member`` threads).
    """
    need = math.ceil(cfg.ensemble.members * cfg.ensemble.cpus_per_member)
    return connect(cfg, address, num_cpus=max(os.cpu_count() or 1, need))


class RayEnsemble:
    """Ray backend of :func:`rdml.ensemble.trainer.train_ensemble` (see the module doc)."""

    name = "ray"

    def __init__(self, cfg: ExperimentConfig, train_set, *, ready_timeout: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rdml.distributed.train_ray import absolute_paths

        self.cfg = absolute_paths(cfg)
        e = self.cfg.ensemble
        self.members = e.members
        subsets = member_subsets(train_set.labels, e.members, e.parts, e.split, seed=self.cfg.train.seed)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        use_gpu = cluster_gpus >= 1 and self.cfg.train.device != "cpu"
        self.gpus_per_member = min(1.0, cluster_gpus / e.members) if use_gpu else 0.0
        bundle: dict[str, float] = {"CPU": e.cpus_per_member}
        if self.gpus_per_member > 0:
            bundle["GPU"] = self.gpus_per_member
        self.pg = placement_group([dict(bundle) for _ in range(e.members)], strategy=e.placement)
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise ConfigError(
                f"the Ray cluster cannot host {e.members} members with {bundle} each ({e.placement}) within "
                f"{ready_timeout:.0f}s; cluster resources: {ray.cluster_resources()}. Lower ensemble.members or "
                "ensemble.cpus_per_member, use placement PACK, or add nodes"
            )
        member_cls, rendezvous_cls = _remote_classes()
        self.rendezvous = rendezvous_cls.options(num_cpus=0).remote(e.members)
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
            ).remote(cfg_dict, k, subsets[k], self.rendezvous, threads)
            for k in range(e.members)
        ]
        self.generation = 0
        self._spe = min(ray.get([a.steps_per_epoch.remote() for a in self.actors]))
        self.failures = 0

    # -- backend protocol --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self._spe

    def step(self, step: int) -> list[dict[str, float]]:
        mode = self.cfg.ensemble.self_transfer
        if mode == "none":
            return self._collect([a.step_none.remote(step) for a in self.actors])
        if mode == "ensemble_gradient":
            return self._collect([a.step_ensemble_gradient.remote(step, self.generation) for a in self.actors])
        wrapped = self._collect([a.craft.remote(step) for a in self.actors])
        refs = [w[0] for w in wrapped]  # ObjectRefs only: the records stay in the object store
        return self._collect([
            a.update.remote(step, [r for j, r in enumerate(refs) if j != k]) for k, a in enumerate(self.actors)
        ])

    def _collect(self, futures: list[Any]) -> list[Any]:
        """Results in order; on a lost member abort the exchange, wait for the restart, MemberFailure."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

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
                except (RayActorError, ActorUnavailableError) as exc:
                    if not lost:
                        ray.get(self.rendezvous.abort.remote(self.generation))
                    lost.append(exc)
                except Exception as exc:  # noqa: BLE001 - re-raised below unless caused by a lost member
                    other.append(exc)
        if lost:
            self.failures += 1
            self.generation += 1
            self.wait_alive()
            raise MemberFailure(f"{len(lost)} member(s) lost during the step: {lost[0]}")
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
        """Per-member timings summed over members: step, put, get, wait (seconds), steps, bytes."""
        import ray

        rows = ray.get([a.get_timing.remote() for a in self.actors])
        return {k: float(sum(r[k] for r in rows)) for k in rows[0]}

    def reset_timing(self) -> None:
        import ray

        ray.get([a.reset_timing.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.kill(self.rendezvous, no_restart=True)
        ray.util.remove_placement_group(self.pg)
