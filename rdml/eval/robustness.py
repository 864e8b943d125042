"""Robustness evaluation: run an attack profile against a model and summarise it (ERS included).

``evaluate_robustness(model, dataset, profile)`` works on any ``nn.Module`` mapping [0,1] images to
L2-normalised embeddings (one model, or an EAT ensemble's combined embedding, attacked white-box end
to end). It

1. embeds the gallery once (the benign database, batched): the whole test set, whose items are also
   the queries (each query's own row excluded), or a separate ``gallery`` (In-Shop; nothing excluded);
2. picks the attacked queries (all, or a seeded subset of ``max_queries``);
3. builds the profile's attack objects (:meth:`AttackProfile.build`) and runs them as the tasks of
   :mod:`rdml.eval.shards` (here, or on the workers of ``executor``): every ranking attack through
   :func:`rdml.attacks.runner.run_ranking_attack` on runs of whole query batches, each clustering
   attack through :func:`rdml.attacks.clustering.attack_clusters`: the same code an attack object runs
   when called; the per-query results are merged in order, so the numbers do not depend on the split;
4. returns a flat dict in rdml's units (:mod:`rdml.metrics`): ``attacks.<name>`` (rank percentiles
   and R@1 as fractions, TMA a cosine, ES:D a distance), ``ers`` (points) and ``collapse`` for ERS
   profiles, ``clustering.<attack>.<metric>`` and
   ``clustering.clean.<metric>`` for clustering attacks (NMI, ARI, cluster accuracy, F1, R@1 as
   fractions, from :mod:`rdml.eval`'s metric functions). Per-query results ride along as attributes.

Two numbers next to ERS separate robustness from artefacts of its formula (both also per query, so
they get intervals):

* ``attacks.ES:D/spread``: ES:D divided by the clean embedding's RMS pairwise distance
  (``embedding_spread``). ES:D is an absolute distance, so shrinking the embedding (a scale-only
  change that keeps every ranking) lowers ES:D and raises ERS without any robustness; the ratio does
  not move.
* ``attacks.GTM|correct``: GTM counted only on the queries whose clean top-1 is correct. GTM is an
  R@1 after the attack, so a model that retrieves badly *before* the attack loses little to it.

With ``intervals`` (the number of bootstrap resamples, 0 for none) every ranking metric, ERS and these
two get a 95% bootstrap interval over the attacked queries (:mod:`rdml.eval.intervals`), reported as
``ci.<key>.low`` / ``ci.<key>.high``. A profile may hold several groups of the ten ERS attacks told
apart by a label prefix (``2eps/CA+`` ...); each complete group gets its own ERS (``ers.2eps``).

A profile with a ``worst_case`` section (``worst28``, ``worst224``) runs its ranking attacks *probed*, and
in the same shards the black-box search and (given a ``surrogate`` model) the transfer attacks; then
:func:`rdml.eval.worst_case.build_worst_case` keeps per attacked item the worst rank of its true match,
R@1 and AP over every attack of the suite, reported as ``worst.recall@1``, ``worst.map``, ``worst.rank``, per group
(``worst.whitebox.*``...) and ``worst.masking`` (1 when a weaker attack beat the white-box ones), with
``ci.worst.*`` intervals from the same resampling. ``result.worst`` holds the per-item values. Other
profiles run exactly as before.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from rdml.attacks.clustering import CLUSTER_METRICS, ClusteringOutcome, cluster_scores
from rdml.attacks.ers import embedding_spread, ers, is_collapsed
from rdml.attacks.inputs import dataset_labels
from rdml.attacks.pgd import frozen_eval
from rdml.attacks.profiles import ERS_KEYS, AttackProfile, load_profile
from rdml.attacks.ranking import Batch, Database, _top1_correct
from rdml.attacks.runner import AttackOutcome, embed_indices
from rdml.attacks.worst_case import with_probe
from rdml.eval.intervals import Interval, bootstrap
from rdml.eval.shards import (
    AttackPlan,
    ClusteringTask,
    InProcess,
    QueryShard,
    ShardExecutor,
    merge_shards,
    plan_tasks,
    run_task,
)
from rdml.eval.worst_case import build_worst_case, clean_member, skipped_groups, take_probes, transfer_attacks

log = logging.getLogger(__name__)

__all__ = ["CLUSTER_METRICS", "RobustnessResult", "cluster_scores", "ers_groups", "evaluate_robustness",
           "select_queries"]


class RobustnessResult(dict):
    """The flat metric dict, plus per-query outcomes, costs and a few examples as attributes."""

    def __init__(self, metrics: dict[str, float]) -> None:
        super().__init__(metrics)
        self.outcomes: list[AttackOutcome] = []
        self.clustering: list[ClusteringOutcome] = []
        self.examples: dict[str, Any] | None = None
        self.benign_recall_at_1: float = math.nan
        self.indices: np.ndarray = np.zeros(0, dtype=np.int64)
        #: per attacked query (aligned with ``indices``): is its clean top-1 (self excluded) of its class?
        self.clean_correct: np.ndarray = np.zeros(0, dtype=bool)
        #: RMS pairwise distance of the clean test embedding (the scale ES:D is compared with)
        self.spread: float = math.nan
        self.intervals: dict[str, Interval] = {}
        #: the worst case over a worst-case suite, per item (None for other profiles; rdml.eval.worst_case)
        self.worst: Any = None

    def per_query_metrics(self) -> dict[str, np.ndarray]:
        """Every ranking metric per attacked query (aligned with ``indices``), plus the derived ones:
        ``<prefix>ES:D/spread`` and ``<prefix>GTM|correct`` (NaN on queries retrieved wrongly before the attack)."""
        out: dict[str, np.ndarray] = {}
        for o in self.outcomes:
            if len(o.indices) != len(self.indices) or not np.array_equal(o.indices, self.indices):
                continue
            for name, v in o.values.items():
                out[name] = np.asarray(v, dtype=np.float64)
        for name in list(out):
            if name.endswith("ES:D") and self.spread > 0:
                out[f"{name}/spread"] = out[name] / self.spread
            if name.endswith("GTM") and len(self.clean_correct) == len(out[name]):
                out[f"{name}|correct"] = np.where(self.clean_correct, out[name], np.nan)
        return out

    @property
    def passes(self) -> dict[str, int]:
        """Forward+backward passes per attack."""
        out = {o.key: o.passes for o in self.outcomes}
        out.update({f"clustering.{o.key}": o.passes for o in self.clustering})
        return out

    @property
    def seconds(self) -> dict[str, float]:
        out = {o.key: o.seconds for o in self.outcomes}
        out.update({f"clustering.{o.key}": o.seconds for o in self.clustering})
        return out

    def per_query(self) -> dict[str, np.ndarray]:
        """Long-format columns: attack, metric, index (test-set position), label, value, iterations."""
        cols: dict[str, list] = {k: [] for k in ("attack", "metric", "index", "label", "value", "iterations")}
        for o in self.outcomes:
            for name, v in o.values.items():
                n = len(v)
                cols["attack"] += [o.key] * n
                cols["metric"] += [name] * n
                cols["index"].append(o.indices)
                cols["label"].append(o.labels)
                cols["value"].append(v.astype(np.float64))
                cols["iterations"].append(o.iterations.astype(np.int64))
        if self.worst is not None:  # the worst case and every member's probe (attack "worst" / member key)
            labels = self.outcomes[0].labels if self.outcomes else np.zeros(len(self.indices), np.int64)
            rows = [("worst", name, v) for name, v in self.worst.per_query.items()]
            rows += [(key, f"probe.{m}", member[m]) for key, member in
                     {"clean": self.worst.clean, **self.worst.members}.items() for m in ("rank", "recall@1", "map")]
            for attack, metric, v in rows:
                cols["attack"] += [attack] * len(v)
                cols["metric"] += [metric] * len(v)
                cols["index"].append(self.indices)
                cols["label"].append(labels)
                cols["value"].append(np.asarray(v, dtype=np.float64))
                cols["iterations"].append(np.zeros(len(v), dtype=np.int64))
        return {
            "attack": np.asarray(cols["attack"], dtype=object),
            "metric": np.asarray(cols["metric"], dtype=object),
            "index": np.concatenate(cols["index"]) if cols["index"] else np.zeros(0, np.int64),
            "label": np.concatenate(cols["label"]) if cols["label"] else np.zeros(0, np.int64),
            "value": np.concatenate(cols["value"]) if cols["value"] else np.zeros(0),
            "iterations": np.concatenate(cols["iterations"]) if cols["iterations"] else np.zeros(0, np.int64),
        }

    def write_parquet(self, path: str | Path) -> Path:
        """Write :meth:`per_query` as a Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = self.per_query()
        table = pa.table({k: (v.tolist() if v.dtype == object else v) for k, v in cols.items()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path


def select_queries(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """All positions, or a seeded sorted subset of ``max_queries`` of them."""
    if max_queries is None or max_queries >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_queries, replace=False)).astype(np.int64)


def evaluate_robustness(
    model: nn.Module,
    dataset: Dataset,
    profile: str | Path | AttackProfile,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_queries: int | None = None,
    batch_size: int = 128,
    *,
    progress: bool = True,
    keep_examples: int = 0,
    keep_images: bool = False,
    database: tuple[torch.Tensor, np.ndarray] | None = None,
    intervals: int = 0,
    gallery: Dataset | None = None,
    surrogate: nn.Module | None = None,
    executor: ShardExecutor | None = None,
) -> RobustnessResult:
    """Run ``profile`` against ``model``: the queries are ``dataset``, the gallery ``gallery`` or ``dataset`` itself.

    Without ``gallery`` (rdml's zero-shot protocol on the whole test set) every test item is a query
    against the whole set with its own row excluded; with ``gallery`` (In-Shop's query/gallery split, or
    a user's own gallery) the queries search the gallery and nothing is excluded (see
    :mod:`rdml.attacks.ranking` for what "self" means to each attack). ``max_queries`` (default: the
    profile's) attacks a seeded subset of the queries; the gallery is always whole. ``keep_examples``
    keeps that many clean/adversarial images with their top-4 retrievals (first ranking attack) for
    the report's panel; ``keep_images`` keeps every adversarial image (for ``rdml attack
    --save-images``). ``database`` passes precomputed benign embeddings and labels of the gallery (else
    they are computed here, in batches of ``batch_size``). Clustering attacks cluster the attacked queries.
    ``surrogate``: the independently trained model a worst-case profile crafts its transfer attacks on
    (ignored by other profiles; without it the transfer check is skipped and the result says so).
    ``executor``: runs the attack work in shards elsewhere (:mod:`rdml.eval.shards`; e.g. Ray actors,
    ``rdml evaluate --workers N``) with the same per-query numbers; None: here, in one shard.
    """
    prof = load_profile(profile)
    device = torch.device(device)
    model = model.to(device)
    n = len(dataset)  # type: ignore[arg-type]
    source = dataset if gallery is None else gallery
    labels_np = dataset_labels(dataset)
    query_labels = labels_np
    if gallery is not None:
        labels_np = dataset_labels(gallery)
    if database is None:
        db_emb = embed_indices(model, source, np.arange(len(source)), batch_size, device)  # type: ignore[arg-type]
    else:
        db_emb = torch.as_tensor(database[0]).to(device)
        labels_np = np.asarray(database[1], dtype=np.int64)
        if gallery is None:
            query_labels = labels_np
    db = Database(db_emb.detach(), torch.as_tensor(labels_np, device=device))
    limit = max_queries if max_queries is not None else prof.max_queries
    indices = select_queries(n, limit, seed)
    own = indices if gallery is None else np.full(len(indices), -1, dtype=np.int64)

    result = RobustnessResult({})
    result.indices = indices
    result.spread = embedding_spread(db_emb.cpu().numpy())
    result.clean_correct = _clean_top1_correct(db, indices, own, query_labels, model, dataset, batch_size, device)
    plan = _plan(prof, model, dataset, db, indices, own, query_labels, gallery, surrogate, batch_size, seed, device)
    executor = executor if executor is not None else InProcess(device)
    tasks = plan_tasks(plan, 1 if executor.workers <= 1 else executor.workers * SHARDS_PER_WORKER,
                       keep_examples=keep_examples, keep_images=keep_images, progress=progress and executor.workers <= 1)
    done = executor.map(run_task, plan, tasks)
    shards = merge_shards([r for r, t in zip(done, tasks, strict=True) if isinstance(t, QueryShard)])
    clustered = [r for r, t in zip(done, tasks, strict=True) if isinstance(t, ClusteringTask)]
    probes: dict[str, dict[str, np.ndarray]] = {}
    for outcome in shards.outcomes:
        result.outcomes.append(outcome)
        if prof.worst_case is not None:
            probes[outcome.key] = take_probes(outcome)
        for name, value in outcome.summary().items():
            result[f"attacks.{name}"] = value
        if outcome.examples is not None:
            result.examples = outcome.examples
        log.info("attack %s: %s (%d passes, %.1f s)", outcome.key, outcome.summary(), outcome.passes, outcome.seconds)

    per_query = result.per_query_metrics()
    for name, values in per_query.items():
        if "/spread" in name or "|correct" in name:
            result[f"attacks.{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    groups = ers_groups(result)
    for prefix in groups:
        result["ers" if not prefix else f"ers.{prefix.rstrip('/')}"] = ers({k: result[f"attacks.{prefix}{k}"]
                                                                          for k in ERS_KEYS})
    if groups:
        from rdml.eval.retrieval import retrieval_metrics

        if gallery is None:
            r1 = retrieval_metrics(db_emb.cpu().numpy(), labels_np)["recall@1"]
        else:
            q_emb = embed_indices(model, dataset, np.arange(n), batch_size, device)
            r1 = retrieval_metrics(q_emb.cpu().numpy(), query_labels, db_emb.cpu().numpy(), labels_np)["recall@1"]
        result.benign_recall_at_1 = r1
        result["embedding_spread"] = result.spread
        result["collapse"] = float(is_collapsed(r1, result.spread))
        if result["collapse"]:
            log.warning("benign R@1 %.1f%%, embedding spread %.3f: the model has collapsed; its ERS %.1f is "
                        "meaningless", 100 * r1, result.spread, result.get("ers", math.nan))
    if intervals and per_query:
        derived = {("ers" if not p else f"ers.{p.rstrip('/')}"): _ers_of(p) for p in groups}
        result.intervals = bootstrap(per_query, derived, n_boot=intervals, seed=seed)
        for name, iv in result.intervals.items():
            key = name if name.startswith("ers") else f"attacks.{name}"
            result[f"ci.{key}.low"], result[f"ci.{key}.high"] = iv.low, iv.high
    if prof.worst_case is not None:
        clean = clean_member(db, indices, own, query_labels[indices], model, dataset, batch_size, device)
        result.worst = build_worst_case(clean, indices, result.outcomes, probes, shards.members,
                                        skipped_groups(prof.worst_case, surrogate is not None))
        result.update(result.worst.metrics())
        if intervals:
            worst_iv = bootstrap(result.worst.per_query, n_boot=intervals, seed=seed)
            result.intervals.update(worst_iv)
            for name, iv in worst_iv.items():
                result[f"ci.{name}.low"], result[f"ci.{name}.high"] = iv.low, iv.high

    for clean_scores, outcome in clustered:
        for name, value in clean_scores.items():
            result[f"clustering.clean.{name}"] = value
        result.clustering.append(outcome)
        for name, value in outcome.values.items():
            result[f"clustering.{outcome.key}.{name}"] = value
        log.info("clustering attack %s: NMI %.3f (%d passes)", outcome.key,
                 result.get(f"clustering.{outcome.key}.nmi", math.nan), outcome.passes)
    return result


SHARDS_PER_WORKER = 4
"""Shards per worker of a sharded evaluation: enough for the workers to even out uneven batches."""


def _plan(prof: AttackProfile, model: nn.Module, dataset: Dataset, db: Database, indices: np.ndarray, own: np.ndarray,
          query_labels: np.ndarray, gallery: Dataset | None, surrogate: nn.Module | None, batch_size: int, seed: int,
          device) -> AttackPlan:
    """The evaluation's tasks' common input: the profile's attack objects (probed for a worst-case suite, with
    its black-box settings and, given a surrogate, its transfer attacks on the surrogate's own gallery)."""
    attacks = prof.build()
    ranking = [a for a in attacks if a.threat == "ranking"]
    settings = prof.worst_case
    plan = AttackPlan(model=model, dataset=dataset, db=db, indices=indices, own=own, labels=query_labels[indices],
                      all_labels=query_labels, attacks=ranking, clustering=[a for a in attacks if a.threat == "clustering"],
                      gallery=gallery, batch_size=batch_size, seed=seed)
    if settings is None:
        return plan
    plan.attacks = [with_probe(a) for a in ranking]
    plan.blackbox = settings.blackbox if settings.blackbox.queries > 0 else None
    if settings.transfer and surrogate is not None:
        source = dataset if gallery is None else gallery
        with frozen_eval(surrogate):
            s_emb = embed_indices(surrogate, source, np.arange(len(source)), batch_size, device)  # type: ignore[arg-type]
        plan.transfer, plan.surrogate = transfer_attacks(settings), surrogate
        plan.surrogate_db = Database(s_emb.detach(), db.labels)
    return plan


def ers_groups(metrics: dict[str, float]) -> list[str]:
    """Label prefixes ('' for none, e.g. '2eps/') under which all ten ERS attacks were run."""
    prefixes = {k[len("attacks."):-len(key)] for k in metrics for key in ERS_KEYS
                if k.startswith("attacks.") and k.endswith(key)}
    return sorted(p for p in prefixes if (not p or p.endswith("/"))
                  and all(f"attacks.{p}{key}" in metrics for key in ERS_KEYS))


def _ers_of(prefix: str):
    def fn(means) -> float:
        return ers({k: means[f"{prefix}{k}"] for k in ERS_KEYS})

    return fn


@torch.no_grad()
def _clean_top1_correct(db: Database, indices: np.ndarray, own: np.ndarray, labels: np.ndarray, model: nn.Module,
                        dataset: Dataset, batch_size: int, device, chunk: int = 1024) -> np.ndarray:
    """Whether each query's clean top-1 (its own row excluded) has its label, in the attacks' R@1 rule."""
    if (own < 0).any():  # queries outside the gallery: their clean embeddings come from a forward pass
        q_emb = embed_indices(model, dataset, indices, batch_size, device)
    out = []
    for s in range(0, len(indices), chunk):
        rows = slice(s, s + chunk)
        idx = torch.as_tensor(own[rows], device=db.emb.device)
        emb = db.emb[idx] if not (own < 0).any() else q_emb[rows]
        lab = db.labels[idx] if not (own < 0).any() else torch.as_tensor(labels[indices[rows]], device=db.emb.device)
        batch = Batch(self_index=idx, labels=lab, clean=emb, clean_db=emb)
        out.append(_top1_correct(emb, db, batch).bool().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)
