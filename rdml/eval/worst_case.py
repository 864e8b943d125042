"""The worst case over a suite, per attacked item, and the checks against gradient masking.

:func:`rdml.eval.robustness.evaluate_robustness` calls :func:`run_worst_case` for a profile with a
``worst_case`` section (``worst28``, ``worst224``) after its white-box attacks, which ran *probed*
(:mod:`rdml.attacks.worst_case`): each reported, besides its own numbers, the rank of the item's true
match, its R@1 and its AP with the adversarial item as a query against the clean gallery. This module

1. takes those probe values out of the attacks' outcomes (they are not ``attacks.*`` metrics);
2. computes the clean member: the benign rank / R@1 / AP of the attacked items, with the benign code
   (:func:`rdml.eval.ranks.positive_ranks`), so an item no attack moved keeps exactly its benign value
   (an attack's value on an item whose input it left unchanged is replaced by the clean one);
3. runs the black-box random search (:mod:`rdml.attacks.blackbox`) and the transfer attacks (the
   profile's ``worst_case.transfer`` specs crafted on a user-given surrogate model, then embedded by the
   target and probed against the target's clean gallery), batch by batch, seeded per (seed, key);
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
from rdml.attacks.runner import attack_generator, embed_indices, iter_batches
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


def clean_member(db: Database, indices: np.ndarray, own: np.ndarray, query_labels: np.ndarray,
                 model: nn.Module, dataset: Dataset, batch_size: int, device) -> dict[str, np.ndarray]:
    """Benign rank / R@1 / AP of the attacked items, from the benign code (so eps = 0 reproduces it exactly)."""
    from rdml.eval.ranks import positive_ranks

    db_emb = db.emb.detach().cpu().numpy()
    db_labels = db.labels.cpu().numpy()
    if (own >= 0).all() and np.array_equal(own, indices):  # the queries are the gallery's rows
        ranks, num_pos = positive_ranks(db_emb, db_labels)
        return ranking_values(ranks[indices], num_pos[indices])
    with frozen_eval(model):
        q_emb = embed_indices(model, dataset, indices, batch_size, device).cpu().numpy()
    ranks, num_pos = positive_ranks(q_emb, query_labels[indices], db_emb, db_labels)
    return ranking_values(ranks, num_pos)


def _batch(model: nn.Module, x0: Tensor, self_index: Tensor, labels: Tensor, db: Database) -> Batch:
    """A batch's rows as the gallery has them (gallery rows, or a clean forward for items outside it)."""
    has = self_index >= 0
    if bool(has.all()):
        clean = db.emb[self_index]
    else:
        with torch.no_grad():
            fresh = model(x0)
        clean = fresh if not bool(has.any()) else torch.where(has.view(-1, 1), db.emb[self_index.clamp_min(0)], fresh)
    return Batch(self_index=self_index, labels=labels, clean=clean, clean_db=clean)


def _values(emb: Tensor, db: Database, batch: Batch, moved: Tensor) -> dict[str, np.ndarray]:
    out = ranking_values(*probe_ranks(emb, db, batch.self_index, batch.labels))
    out["moved"] = moved.detach().cpu().numpy().astype(np.float64)
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def run_blackbox(model: nn.Module, dataset: Dataset, indices: np.ndarray, own: np.ndarray, labels: np.ndarray,
                 db: Database, settings: Any, *, batch_size: int, device, seed: int,
                 progress: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The random search over the attacked items, batch by batch (one generator for the whole run)."""
    generator = attack_generator(seed, "blackbox")
    parts, queries = [], []
    started = time.perf_counter()
    start = 0
    with frozen_eval(model):
        for images, _ in tqdm(iter_batches(dataset, indices, batch_size), desc="blackbox", disable=not progress,
                              leave=False, total=(len(indices) + batch_size - 1) // batch_size):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            idx = torch.as_tensor(own[rows], device=device)
            batch = _batch(model, x0, idx, torch.as_tensor(labels[rows], device=device), db)
            res = square_search(model, x0, db, batch, settings.eps, settings.queries, settings.p_init, generator)
            parts.append(_values(res.emb, db, batch, moved_inputs(res.x_adv, x0)))
            queries.append(res.queries.numpy())
    used = np.concatenate(queries) if queries else np.zeros(0)
    cost = {"queries": float(used.mean()) if len(used) else 0.0, "seconds": time.perf_counter() - started}
    return _concat(parts), cost


def run_transfer(attack: RankingAttack, surrogate: nn.Module, model: nn.Module, dataset: Dataset,
                 indices: np.ndarray, own: np.ndarray, labels: np.ndarray, db: Database, surrogate_db: Database, *,
                 key: str, batch_size: int, device, seed: int, progress: bool
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``attack`` crafted on the surrogate (its own clean gallery, targets and seeds), probed on the target."""
    generator, pgd_generator = attack_generator(seed, key), attack_generator(seed + 1, key)
    parts, passes = [], 0
    started = time.perf_counter()
    start = 0
    with frozen_eval(surrogate, model):
        for images, _ in tqdm(iter_batches(dataset, indices, batch_size), desc=key, disable=not progress,
                              leave=False, total=(len(indices) + batch_size - 1) // batch_size):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            idx = torch.as_tensor(own[rows], device=device)
            lab = torch.as_tensor(labels[rows], device=device)
            s_batch = _batch(surrogate, x0, idx, lab, surrogate_db)
            s_batch.clean = attack.clean_reference(surrogate, x0, s_batch.clean_db)
            ctx = attack.setup(surrogate_db, s_batch, generator)
            res = attack.perturb(surrogate, x0, ctx, pgd_generator)
            passes += res.result.passes
            t_batch = _batch(model, x0, idx, lab, db)
            with torch.no_grad():
                emb = model(res.x_adv)
            parts.append(_values(emb, db, t_batch, moved_inputs(res.x_adv, x0)))
    return _concat(parts), {"passes": float(passes), "seconds": time.perf_counter() - started}


def run_worst_case(result: Any, probes: dict[str, dict[str, np.ndarray]], prof: AttackProfile, model: nn.Module,
                   dataset: Dataset, indices: np.ndarray, own: np.ndarray, labels: np.ndarray, db: Database, *,
                   surrogate: nn.Module | None, gallery: Dataset | None, batch_size: int, device, seed: int,
                   progress: bool) -> WorstCase:
    """Steps 2-4 of the module docstring after the white-box attacks of ``result`` ran probed.

    ``probes[key]`` are the probe values taken out of attack ``key``'s outcome (:func:`take_probes`);
    ``labels`` are the attacked items' labels (aligned with ``indices``)."""
    settings = prof.worst_case
    assert settings is not None
    wc = WorstCase(indices=indices, clean=clean_member(db, indices, own, _full_labels(labels, indices, dataset),
                                                       model, dataset, batch_size, device))
    for outcome in result.outcomes:
        if outcome.key in probes:
            wc.add(outcome.key, "whitebox", probes[outcome.key])
            wc.costs[outcome.key] = {"passes": float(outcome.passes), "seconds": outcome.seconds}
    if settings.blackbox.queries > 0:
        values, cost = run_blackbox(model, dataset, indices, own, labels, db, settings.blackbox,
                                    batch_size=batch_size, device=device, seed=seed, progress=progress)
        wc.add("blackbox", "blackbox", values)
        wc.costs["blackbox"] = cost
        log.info("black-box search: R@1 %.3f (%.0f queries per item)", _mean(wc.members["blackbox"]["recall@1"]),
                 cost["queries"])
    else:
        wc.skipped["blackbox"] = "the profile's black-box budget is 0 queries"
    if settings.transfer and surrogate is None:
        wc.skipped["transfer"] = "no surrogate model given (rdml evaluate --surrogate PATH, rdml.evaluate(surrogate=...))"
    elif settings.transfer:
        source = dataset if gallery is None else gallery
        with frozen_eval(surrogate):
            s_emb = embed_indices(surrogate, source, np.arange(len(source)), batch_size, device)  # type: ignore[arg-type]
        surrogate_db = Database(s_emb.detach(), db.labels)
        specs = AttackProfile(name="transfer", attacks=settings.transfer).keyed()
        for key, spec in specs:
            attack = spec.build(f"transfer/{key}")
            values, cost = run_transfer(attack, surrogate, model, dataset, indices, own, labels, db, surrogate_db,
                                        key=attack.key, batch_size=batch_size, device=device, seed=seed,
                                        progress=progress)
            wc.add(attack.key, "transfer", values)
            wc.costs[attack.key] = cost
    elif not settings.transfer:
        wc.skipped["transfer"] = "the profile has no transfer attacks"
    wc.aggregate()
    if wc.flagged:
        log.warning("worst-case suite: gradient masking suspected: %s", "; ".join(wc.reasons))
    return wc


def take_probes(outcome: Any) -> dict[str, np.ndarray]:
    """Step 1: remove a probed attack's probe values from its outcome (they are not ``attacks.*`` metrics)."""
    return split_probe(outcome.values, outcome.key)


def _full_labels(labels: np.ndarray, indices: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Query labels indexed by dataset position (``clean_member`` takes ``labels[indices]``)."""
    from rdml.attacks.inputs import dataset_labels

    full = dataset_labels(dataset).copy()
    full[indices] = labels
    return full
