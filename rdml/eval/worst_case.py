"""The worst case over a suite, per attacked item, and the checks against gradient masking.

:func:`rdml.eval.robustness.evaluate_robustness` runs a profile with a ``worst_case`` section
(``worst28``, ``worst224``) in shards (:mod:`rdml.eval.shards`; one shard in one process by default):
its white-box attacks ran *probed* (:mod:`rdml.attacks.worst_case`): each reported, besides its own
numbers, the rank of the item's true match, its R@1 and its AP with the adversarial item as a query
against the clean gallery. This module

1. takes those probe values out of the attacks' outcomes (they are not ``attacks.*`` metrics);
2. computes the clean member: the benign rank / R@1 / AP of the attacked items, with the benign code
   (:func:`rdml.eval.ranks.positive_ranks`), so an item no attack moved keeps exactly its benign value
   (an attack's value on an item whose input it left unchanged is replaced by the clean one);
3. runs, on a shard's items, the black-box random search (:mod:`rdml.attacks.blackbox`, one generator
   per batch of the attacked items) and the transfer attacks (the profile's ``worst_case.transfer``
   specs crafted on a user-given surrogate model with their own seeded targets, then embedded by the
   target and probed against the target's clean gallery);
4. keeps per item the worst value over every member (min R@1 and AP, max rank), over all of them and
   per group (``whitebox``, ``blackbox``, ``transfer``), and flags the model when a weaker group beats
   the white-box one by more than the metric's tolerance, in the robust direction of the registry
   (:mod:`rdml.metrics`: ``worst.recall@1`` and ``worst.map`` are fractions, higher is robust, 0.01).

Every flat number is ``worst.*`` (declared in :mod:`rdml.metrics`); bootstrap intervals over the
attacked items use the same resampling as ERS (``ci.worst.recall@1.low``...).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rdml.attacks.blackbox import square_search
from rdml.attacks.pgd import frozen_eval
from rdml.attacks.profiles import AttackProfile
from rdml.attacks.ranking import Batch, Database, RankingAttack
from rdml.attacks.runner import attack_generator, batch_context, clean_rows, embed_indices, iter_batches
from rdml.attacks.worst_case import (
    WORST_METRICS,
    WorstCaseOutcome,
    moved_inputs,
    probe_ranks,
    ranking_values,
    split_probe,
)

log = logging.getLogger(__name__)

GROUPS = ("whitebox", "blackbox", "transfer")
_WHAT = {"blackbox": "black-box search (model outputs only)", "transfer": "transfer attacks (crafted on the surrogate)"}
WEAK_GROUPS = ("blackbox", "transfer")
FLAG_METRICS = ("recall@1", "map")
"""The numbers the masking check compares (the robust direction and tolerance come from the registry)."""


@dataclass
class WorstCase:
    """Per attacked item: every member's ranking numbers, the worst case, the flag (aligned with ``indices``)."""

    indices: np.ndarray
    clean: dict[str, np.ndarray]
    members: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # key -> metric -> per item
    group_of: dict[str, str] = field(default_factory=dict)  # member key -> group
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it did not run
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # member key -> passes / queries / seconds
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # worst.<m>, worst.<group>.<m>
    flagged: bool = False
    reasons: list[str] = field(default_factory=list)

    def add(self, key: str, group: str, values: dict[str, np.ndarray]) -> None:
        """A member's probe values; items it did not move (``moved`` 0) get the clean values."""
        moved = np.asarray(values.get("moved", np.ones(len(self.indices))), dtype=bool)
        member = {}
        for m in WORST_METRICS:
            v = np.asarray(values[m], dtype=np.float64)
            member[m] = np.where(moved, v, self.clean[m])
        member["moved"] = moved.astype(np.float64)
        self.members[key] = member
        self.group_of[key] = group

    def aggregate(self) -> None:
        """The worst case over all members and per group (the clean item is in every one), and the flag."""
        from rdml.metrics import lookup

        def worst(keys: list[str]) -> dict[str, np.ndarray]:
            out = {}
            for m in WORST_METRICS:
                table = np.stack([self.clean[m]] + [self.members[k][m] for k in keys])
                with np.errstate(invalid="ignore"):
                    out[m] = _nanmax(table) if m == "rank" else _nanmin(table)
            return out

        self.per_query = {f"worst.{m}": v for m, v in worst(list(self.members)).items()}
        for group in GROUPS:
            keys = [k for k, g in self.group_of.items() if g == group]
            if keys:
                self.per_query.update({f"worst.{group}.{m}": v for m, v in worst(keys).items()})
        self.reasons = []
        for group in WEAK_GROUPS:
            if f"worst.{group}.recall@1" not in self.per_query:
                continue
            for m in FLAG_METRICS:
                spec = lookup(f"worst.{m}")
                white, weak = _mean(self.per_query[f"worst.whitebox.{m}"]), _mean(self.per_query[f"worst.{group}.{m}"])
                if spec.better(white, weak) > spec.tolerance:
                    self.reasons.append(f"the {_WHAT[group]} beat the white-box attacks on worst-case {m}: "
                                        f"{spec.show(weak)}% vs {spec.show(white)}% (tolerance "
                                        f"{spec.show(spec.tolerance)}%)")
        self.flagged = bool(self.reasons)

    def metrics(self) -> dict[str, float]:
        """The flat ``worst.*`` means (fractions; the rank a count) and ``worst.masking`` (1: flagged)."""
        out = {k: _mean(v) for k, v in self.per_query.items()}
        out["worst.masking"] = float(self.flagged)
        return out

    def by_attack(self) -> dict[str, dict[str, float]]:
        """Every member's means (R@1, mAP, rank), its group and the share of items it moved."""
        out = {"clean": {m: _mean(self.clean[m]) for m in WORST_METRICS} | {"group": "clean"}}
        for key, member in self.members.items():
            out[key] = {m: _mean(member[m]) for m in WORST_METRICS} | {"group": self.group_of[key],
                                                                     "moved": _mean(member["moved"])}
            out[key].update(self.costs.get(key, {}))
        return out

    def outcome(self, result: Any = None) -> WorstCaseOutcome:
        """The API object's view (:class:`rdml.attacks.worst_case.WorstCaseOutcome`)."""
        per_query = {m: self.per_query[f"worst.{m}"] for m in WORST_METRICS}
        groups = {g: {m: self.per_query[f"worst.{g}.{m}"] for m in WORST_METRICS}
                  for g in GROUPS if f"worst.{g}.recall@1" in self.per_query}
        return WorstCaseOutcome(per_query=per_query, mean={m: _mean(v) for m, v in per_query.items()}, groups=groups,
                                members=self.members, flagged=self.flagged, reasons=list(self.reasons),
                                metrics=self.metrics(), indices=self.indices, skipped=dict(self.skipped), result=result)


def _mean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def _nanmin(table: np.ndarray) -> np.ndarray:
    finite = np.isfinite(table).any(axis=0)
    return np.where(finite, np.nanmin(np.where(np.isfinite(table), table, np.inf), axis=0), np.nan)


def _nanmax(table: np.ndarray) -> np.ndarray:
    finite = np.isfinite(table).any(axis=0)
    return np.where(finite, np.nanmax(np.where(np.isfinite(table), table, -np.inf), axis=0), np.nan)


def clean_member(db: Database, indices: np.ndarray, own: np.ndarray, labels: np.ndarray,
                 model: nn.Module, dataset: Dataset, batch_size: int, device) -> dict[str, np.ndarray]:
    """Benign rank / R@1 / AP of the attacked items (``labels``: theirs), from the benign code (so eps = 0
    reproduces it exactly)."""
    from rdml.eval.ranks import positive_ranks

    db_emb = db.emb.detach().cpu().numpy()
    db_labels = db.labels.cpu().numpy()
    if (own >= 0).all() and np.array_equal(own, indices):  # the queries are the gallery's rows
        ranks, num_pos = positive_ranks(db_emb, db_labels)
        return ranking_values(ranks[indices], num_pos[indices])
    with frozen_eval(model):
        q_emb = embed_indices(model, dataset, indices, batch_size, device).cpu().numpy()
    ranks, num_pos = positive_ranks(q_emb, labels, db_emb, db_labels)
    return ranking_values(ranks, num_pos)


def _values(emb: Tensor, db: Database, batch: Batch, moved: Tensor) -> dict[str, np.ndarray]:
    out = ranking_values(*probe_ranks(emb, db, batch.self_index, batch.labels))
    out["moved"] = moved.detach().cpu().numpy().astype(np.float64)
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def blackbox_generator(seed: int, batch: int) -> torch.Generator:
    """The random search's generator for batch ``batch`` of the attacked items (one per batch: its draws
    depend on when the search stops, so a shard could not replay them; suite version 2 on)."""
    return attack_generator(seed, f"blackbox/batch{batch}")


def run_blackbox(model: nn.Module, dataset: Dataset, indices: np.ndarray, own: np.ndarray, labels: np.ndarray,
                 db: Database, settings: Any, *, batch_size: int, device, seed: int, progress: bool,
                 first_batch: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The random search over the attacked items, batch by batch (``first_batch``: the number of the first)."""
    parts, queries = [], []
    started = time.perf_counter()
    start = 0
    with frozen_eval(model):
        for b, (images, _) in enumerate(tqdm(iter_batches(dataset, indices, batch_size), desc="blackbox",
                                             disable=not progress, leave=False,
                                             total=(len(indices) + batch_size - 1) // batch_size)):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            idx = torch.as_tensor(own[rows], device=device)
            clean = clean_rows(model, x0, idx, db)
            batch = Batch(self_index=idx, labels=torch.as_tensor(labels[rows], device=device), clean=clean,
                          clean_db=clean)
            res = square_search(model, x0, db, batch, settings.eps, settings.queries, settings.p_init,
                                blackbox_generator(seed, first_batch + b))
            parts.append(_values(res.emb, db, batch, moved_inputs(res.x_adv, x0)))
            queries.append(res.queries.numpy())
    used = np.concatenate(queries) if queries else np.zeros(0)
    cost = {"queries": float(used.mean()) if len(used) else 0.0, "seconds": time.perf_counter() - started}
    return _concat(parts), cost


def run_transfer(attack: RankingAttack, surrogate: nn.Module, model: nn.Module, dataset: Dataset,
                 indices: np.ndarray, own: np.ndarray, labels: np.ndarray, db: Database, surrogate_db: Database, *,
                 batch_size: int, device, generators: tuple[torch.Generator, torch.Generator], progress: bool
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``attack`` crafted on the surrogate (its own clean gallery, targets and seeds), probed on the target."""
    generator, pgd_generator = generators
    parts, passes = [], 0
    started = time.perf_counter()
    start = 0
    with frozen_eval(surrogate, model):
        for images, _ in tqdm(iter_batches(dataset, indices, batch_size), desc=attack.key, disable=not progress,
                              leave=False, total=(len(indices) + batch_size - 1) // batch_size):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            idx = torch.as_tensor(own[rows], device=device)
            lab = torch.as_tensor(labels[rows], device=device)
            _, ctx = batch_context(attack, surrogate, x0, idx, lab, surrogate_db, generator)
            res = attack.perturb(surrogate, x0, ctx, pgd_generator)
            passes += res.result.passes
            clean = clean_rows(model, x0, idx, db)
            with torch.no_grad():
                emb = model(res.x_adv)
            parts.append(_values(emb, db, Batch(self_index=idx, labels=lab, clean=clean, clean_db=clean),
                                 moved_inputs(res.x_adv, x0)))
    return _concat(parts), {"passes": float(passes), "seconds": time.perf_counter() - started}


def transfer_attacks(settings: Any) -> list[RankingAttack]:
    """The suite's transfer attacks as objects, keyed ``transfer/<key>``."""
    specs = AttackProfile(name="transfer", attacks=settings.transfer).keyed()
    return [spec.build(f"transfer/{key}") for key, spec in specs]


def skipped_groups(settings: Any, has_surrogate: bool) -> dict[str, str]:
    """The checks of the suite that do not run, and why."""
    skipped = {}
    if settings.blackbox.queries <= 0:
        skipped["blackbox"] = "the profile's black-box budget is 0 queries"
    if not settings.transfer:
        skipped["transfer"] = "the profile has no transfer attacks"
    elif not has_surrogate:
        skipped["transfer"] = "no surrogate model given (rdml evaluate --surrogate PATH, rdml.evaluate(surrogate=...))"
    return skipped


Member = tuple[str, dict[str, np.ndarray], dict[str, float]]
"""A worst-case member that is not a white-box attack: (group, per-item probe values, costs)."""


def build_worst_case(clean: dict[str, np.ndarray], indices: np.ndarray, outcomes: list, probes: dict[str, dict],
                     members: dict[str, Member], skipped: dict[str, str]) -> WorstCase:
    """Step 4: the white-box attacks' probes and the other members, the worst case per item, the flag."""
    wc = WorstCase(indices=indices, clean=clean, skipped=dict(skipped))
    for outcome in outcomes:
        if outcome.key in probes:
            wc.add(outcome.key, "whitebox", probes[outcome.key])
            wc.costs[outcome.key] = {"passes": float(outcome.passes), "seconds": outcome.seconds}
    for key, (group, values, cost) in members.items():
        wc.add(key, group, values)
        wc.costs[key] = cost
    if "blackbox" in wc.members:
        log.info("black-box search: R@1 %.3f (%.0f queries per item)", _mean(wc.members["blackbox"]["recall@1"]),
                 wc.costs["blackbox"]["queries"])
    wc.aggregate()
    if wc.flagged:
        log.warning("worst-case suite: gradient masking suspected: %s", "; ".join(wc.reasons))
    return wc


def take_probes(outcome: Any) -> dict[str, np.ndarray]:
    """Step 1: remove a probed attack's probe values from its outcome (they are not ``attacks.*`` metrics)."""
    return split_probe(outcome.values, outcome.key)
