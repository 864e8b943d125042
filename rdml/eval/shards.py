"""Attack evaluation in shards: the same per-query numbers in one process or spread over workers.

An evaluation's attack work is a list of independent tasks over one :class:`AttackPlan` (the model, the
attacked items, the benign gallery embedded once, the attack objects):

* a :class:`QueryShard`: consecutive whole batches of the attacked items, on which every ranking attack
  of the profile runs (and, for a worst-case suite, the black-box search and the transfer attacks);
* a :class:`ClusteringTask`: one clustering attack on the whole attacked set (it clusters them jointly).

An executor runs the tasks and returns their results in order: :class:`InProcess` (the default, one
shard holding every batch) or Ray actors (:class:`rdml.distributed.attack_workers.RayAttackWorkers`,
one per GPU where there are GPUs; ``rdml evaluate --workers N``). The driver merges the shards'
outcomes (:func:`rdml.attacks.runner.merge_outcomes`) and computes every summary (means, ERS,
intervals, the worst case) from the merged per-query values, so nothing downstream knows how the work
was split.

Why the numbers are identical per query, bit for bit, however the work is split: shards are cut at
batch boundaries of the single-process run, so every batch holds the same items; an attack run draws
its targets and random starts from two generators that run on across batches, and a shard starts from
the states the single-process run has at its first batch, obtained by replaying the earlier batches'
draws without attacking (:func:`rdml.attacks.runner.replay_generators`; the draws depend on shapes
only). The black-box search, whose draws depend on when it stops, takes one generator per batch.
Clustering attacks draw from their own generator per (seed, attack). The model must run with the same
number of threads on the same kind of device in every worker (float sums depend on it).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from rdml.attacks.ranking import Database, RankingAttack
from rdml.attacks.runner import (
    AttackOutcome,
    attack_generators,
    merge_outcomes,
    replay_generators,
    run_ranking_attack,
)

__all__ = ["AttackPlan", "ClusteringTask", "InProcess", "QueryShard", "ShardExecutor", "ShardResult", "merge_shards",
           "plan_tasks", "run_task"]


@dataclass
class AttackPlan:
    """What every task of one evaluation needs, built once by the driver (sent once to each worker).

    ``indices``: the attacked items (positions in ``dataset``); ``own``: each one's gallery row (-1:
    outside the gallery); ``labels``: their labels; ``all_labels``: the labels of every item of
    ``dataset`` (the clustering attacks map them per set). ``attacks``: the ranking attack objects
    (probed for a worst-case suite); ``transfer``: the worst-case suite's transfer attacks (crafted on
    ``surrogate`` against ``surrogate_db``); ``blackbox``: its random-search settings (None: no search).
    """

    model: nn.Module
    dataset: Dataset
    db: Database
    indices: np.ndarray
    own: np.ndarray
    labels: np.ndarray
    all_labels: np.ndarray
    attacks: list[RankingAttack]
    clustering: list[Any] = field(default_factory=list)
    gallery: Dataset | None = None
    batch_size: int = 128
    seed: int = 0
    blackbox: Any = None
    transfer: list[RankingAttack] = field(default_factory=list)
    surrogate: nn.Module | None = None
    surrogate_db: Database | None = None

    def to(self, device: str | torch.device) -> AttackPlan:
        """A copy with the models and the galleries on ``device`` (the data sets are shared, not copied; a
        model already there is shared too, one elsewhere is copied so the caller's stays where it is)."""
        plan = copy.copy(self)
        plan.model = _on(self.model, torch.device(device))
        plan.db = Database(self.db.emb.to(device), self.db.labels.to(device))
        if self.surrogate is not None and self.surrogate_db is not None:
            plan.surrogate = _on(self.surrogate, torch.device(device))
            plan.surrogate_db = Database(self.surrogate_db.emb.to(device), self.surrogate_db.labels.to(device))
        return plan

    @property
    def batches(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when its parameters are on ``device``, else a copy moved there."""
    current = next((p.device for p in model.parameters()), device)
    same = current.type == device.type and (device.index is None or current.index == device.index)
    return model if same else copy.deepcopy(model).to(device)


@dataclass
class QueryShard:
    """Batches ``first_batch`` .. ``first_batch + batches - 1`` of the attacked items, every ranking attack.

    ``starts``: per attack key, the two generator states the single-process run has at ``first_batch``
    (None: the run's fresh generators, which is right for the shard that starts at batch 0).
    """

    first_batch: int
    batches: int
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    keep_examples: int = 0
    keep_images: bool = False
    progress: bool = False


@dataclass
class ClusteringTask:
    """Clustering attack number ``number`` of the plan on the whole attacked set."""

    number: int
    progress: bool = False


@dataclass
class ShardResult:
    """A shard's outcomes: one per ranking attack, the worst-case suite's other members, time spent attacking."""

    outcomes: list[AttackOutcome]
    members: dict[str, tuple[str, dict[str, np.ndarray], dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0


class ShardExecutor(Protocol):
    """Runs ``fn(plan, task, device)`` for every task and returns the results in task order."""

    workers: int

    def map(self, fn: Any, plan: AttackPlan, tasks: Sequence[Any]) -> list[Any]: ...


class InProcess:
    """The default executor: every task here, one after another, on the plan's device."""

    workers = 1

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def map(self, fn: Any, plan: AttackPlan, tasks: Sequence[Any]) -> list[Any]:
        return [fn(plan, task, self.device) for task in tasks]


def plan_tasks(plan: AttackPlan, shards: int, *, keep_examples: int = 0, keep_images: bool = False,
               progress: bool = False) -> list[QueryShard | ClusteringTask]:
    """The ranking work cut into ``shards`` contiguous runs of whole batches (at most one per batch), each
    with the generator states it starts from, then one task per clustering attack.

    With one shard nothing is replayed: the shard is the single-process run itself.
    """
    total = plan.batches
    shards = max(1, min(shards, total))
    bounds = np.linspace(0, total, shards + 1).round().astype(int)
    tasks: list[QueryShard | ClusteringTask] = []
    image_shape = tuple(plan.dataset[int(plan.indices[0])][0].shape) if len(plan.indices) else ()
    generators = {atk.key: attack_generators(plan.seed, atk.key) for atk in [*plan.attacks, *plan.transfer]}
    transfer_keys = {atk.key for atk in plan.transfer}
    for s in range(shards):
        first, last = int(bounds[s]), int(bounds[s + 1])
        starts = None
        if first > 0:
            starts = {}
            for atk in [*plan.attacks, *plan.transfer]:
                db = plan.surrogate_db if atk.key in transfer_keys else plan.db
                prev = int(bounds[s - 1])  # the generators stand at this shard's predecessor's first batch
                rows = slice(prev * plan.batch_size, first * plan.batch_size)
                gens = replay_generators(atk, generators[atk.key], db, plan.own[rows], plan.labels[rows], image_shape,
                                         plan.batch_size, first - prev)
                starts[atk.key] = (gens[0].get_state(), gens[1].get_state())
        tasks.append(QueryShard(first_batch=first, batches=last - first, starts=starts,
                                keep_examples=keep_examples if s == 0 else 0, keep_images=keep_images,
                                progress=progress))
    tasks += [ClusteringTask(number=i, progress=progress) for i in range(len(plan.clustering))]
    return tasks


def run_task(plan: AttackPlan, task: QueryShard | ClusteringTask, device: torch.device) -> Any:
    """Run one task (in the driver, or in a worker after the plan was moved to its device)."""
    if isinstance(task, ClusteringTask):
        from rdml.attacks.clustering import attack_clusters

        clean, outcomes = attack_clusters([plan.clustering[task.number]], plan.model, plan.dataset, plan.indices,
                                          plan.all_labels, batch_size=plan.batch_size, device=device, seed=plan.seed,
                                          progress=task.progress)
        return clean, outcomes[0]
    return _run_shard(plan, task, device)


def _generators(starts: dict | None, seed: int, key: str) -> tuple[torch.Generator, torch.Generator]:
    generator, pgd_generator = attack_generators(seed, key)
    if starts is not None:
        generator.set_state(starts[key][0])
        pgd_generator.set_state(starts[key][1])
    return generator, pgd_generator


def _run_shard(plan: AttackPlan, shard: QueryShard, device: torch.device) -> ShardResult:
    from rdml.eval.worst_case import run_blackbox, run_transfer

    rows = slice(shard.first_batch * plan.batch_size, (shard.first_batch + shard.batches) * plan.batch_size)
    indices, own, labels = plan.indices[rows], plan.own[rows], plan.labels[rows]
    outside = plan.gallery is not None  # queries outside the gallery: their rows and labels are passed
    started = time.perf_counter()
    result = ShardResult(outcomes=[])
    for i, attack in enumerate(plan.attacks):
        result.outcomes.append(run_ranking_attack(
            plan.model, plan.dataset, indices, attack, plan.db, key=attack.key, batch_size=plan.batch_size,
            device=device, progress=shard.progress, keep_images=shard.keep_images,
            keep_examples=shard.keep_examples if i == 0 else 0, self_index=own if outside else None,
            labels=labels if outside else None, gallery_dataset=plan.gallery,
            generators=_generators(shard.starts, plan.seed, attack.key)))
    if plan.blackbox is not None:
        values, cost = run_blackbox(plan.model, plan.dataset, indices, own, labels, plan.db, plan.blackbox,
                                    batch_size=plan.batch_size, device=device, seed=plan.seed,
                                    progress=shard.progress, first_batch=shard.first_batch)
        result.members["blackbox"] = ("blackbox", values, cost)
    for attack in plan.transfer:
        assert plan.surrogate is not None and plan.surrogate_db is not None
        values, cost = run_transfer(attack, plan.surrogate, plan.model, plan.dataset, indices, own, labels, plan.db,
                                    plan.surrogate_db, batch_size=plan.batch_size, device=device,
                                    generators=_generators(shard.starts, plan.seed, attack.key),
                                    progress=shard.progress)
        result.members[attack.key] = ("transfer", values, cost)
    result.seconds = time.perf_counter() - started
    return result


def merge_shards(results: Sequence[ShardResult]) -> ShardResult:
    """The shards' results as one: outcomes merged per attack, members' values concatenated, costs added."""
    outcomes = [merge_outcomes([r.outcomes[i] for r in results]) for i in range(len(results[0].outcomes))]
    members = {}
    for key, (group, _, _) in results[0].members.items():
        values = {m: np.concatenate([r.members[key][1][m] for r in results]) for m in results[0].members[key][1]}
        costs = [r.members[key][2] for r in results]
        cost = {c: float(sum(x[c] for x in costs)) for c in costs[0]}
        if "queries" in cost:  # a mean per item: weight the shards by their items
            sizes = [len(next(iter(r.members[key][1].values()))) for r in results]
            cost["queries"] = float(sum(x["queries"] * n for x, n in zip(costs, sizes, strict=True)) / max(1, sum(sizes)))
        members[key] = (group, values, cost)
    return ShardResult(outcomes=outcomes, members=members, seconds=sum(r.seconds for r in results))
