"""Robustness evaluation: run an attack profile against a model and summarise it (ERS included).

``evaluate_robustness(model, dataset, profile)`` works on any ``nn.Module`` mapping [0,1] images to
L2-normalised embeddings (one model, or an EAT ensemble's combined embedding, attacked white-box end
to end). It

1. embeds the whole test set once (the benign database, batched);
2. picks the attacked samples (all, or a seeded subset of ``max_queries``);
3. runs every ranking attack of the profile through :func:`rdml.attacks.runner.run_ranking_attack`
   and every clustering attack through :func:`rdml.attacks.clustering.run_clustering_attack`;
4. returns a flat dict: ``attacks.<name>`` (the reported number: percentiles and R@1 in %, TMA cosine,
   ES:D distance), ``ers`` and ``collapse`` for ERS profiles, ``clustering.<attack>.<metric>`` and
   ``clustering.clean.<metric>`` for clustering attacks (NMI, ARI, cluster accuracy, F1, R@1 as
   fractions, from :mod:`rdml.eval`'s metric functions). Per-query results ride along as attributes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from rdml.attacks.clustering import ClusteringOutcome, run_clustering_attack
from rdml.attacks.ers import embedding_spread, ers, is_collapsed
from rdml.attacks.pgd import frozen_eval
from rdml.attacks.profiles import ERS_KEYS, AttackProfile, load_profile
from rdml.attacks.ranking import Database
from rdml.attacks.runner import AttackOutcome, dataset_labels, embed_indices, run_ranking_attack

log = logging.getLogger(__name__)

CLUSTER_METRICS = ("nmi", "ari", "cluster_acc", "cluster_f1", "recall@1")


class RobustnessResult(dict):
    """The flat metric dict, plus per-query outcomes, costs and a few examples as attributes."""

    def __init__(self, metrics: dict[str, float]) -> None:
        super().__init__(metrics)
        self.outcomes: list[AttackOutcome] = []
        self.clustering: list[ClusteringOutcome] = []
        self.examples: dict[str, Any] | None = None
        self.benign_recall_at_1: float = math.nan
        self.indices: np.ndarray = np.zeros(0, dtype=np.int64)

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
) -> RobustnessResult:
    """Run ``profile`` against ``model`` on ``dataset`` (the zero-shot test set, queries = database).

    ``max_queries`` (default: the profile's) attacks a seeded subset; the database is always the
    whole set. ``keep_examples`` keeps that many clean/adversarial images with their top-4
    retrievals (first ranking attack) for the report's panel; ``keep_images`` keeps every
    adversarial image (for ``rdml attack --save-images``). ``database`` passes precomputed benign
    embeddings and labels of ``dataset`` (else they are computed here, in batches of ``batch_size``).
    """
    prof = load_profile(profile)
    device = torch.device(device)
    model = model.to(device)
    n = len(dataset)  # type: ignore[arg-type]
    labels_np = dataset_labels(dataset)
    if database is None:
        db_emb = embed_indices(model, dataset, np.arange(n), batch_size, device)
    else:
        db_emb = torch.as_tensor(database[0]).to(device)
        labels_np = np.asarray(database[1], dtype=np.int64)
    db = Database(db_emb.detach(), torch.as_tensor(labels_np, device=device))
    limit = max_queries if max_queries is not None else prof.max_queries
    indices = select_queries(n, limit, seed)

    result = RobustnessResult({})
    result.indices = indices
    keyed = prof.keyed()
    ranking = [(k, s) for k, s in keyed if s.threat == "ranking"]
    clustering = [(k, s) for k, s in keyed if s.threat == "clustering"]
    for i, (key, spec) in enumerate(ranking):
        outcome = run_ranking_attack(
            model, dataset, indices, spec, db, key=key, batch_size=batch_size, device=device, seed=seed,
            progress=progress, keep_images=keep_images, keep_examples=keep_examples if i == 0 else 0,
        )
        result.outcomes.append(outcome)
        for name, value in outcome.summary().items():
            result[f"attacks.{name}"] = value
        if outcome.examples is not None:
            result.examples = outcome.examples
        log.info("attack %s: %s (%d passes, %.1f s)", key, outcome.summary(), outcome.passes, outcome.seconds)

    if prof.ers or all(f"attacks.{k}" in result for k in ERS_KEYS):
        if all(f"attacks.{k}" in result for k in ERS_KEYS):
            from rdml.eval.retrieval import retrieval_metrics

            result["ers"] = ers(result)
            r1 = retrieval_metrics(db_emb.cpu().numpy(), labels_np)["recall@1"]
            spread = embedding_spread(db_emb.cpu().numpy())
            result.benign_recall_at_1 = r1
            result["embedding_spread"] = spread
            result["collapse"] = float(is_collapsed(r1, spread))
            if result["collapse"]:
                log.warning("benign R@1 %.1f%%, embedding spread %.3f: the model has collapsed; its ERS %.1f is "
                            "meaningless", 100 * r1, spread, result["ers"])

    if clustering:
        _clustering(result, model, dataset, indices, clustering, labels_np, batch_size, device, seed, progress)
    return result


def _cluster_scores(emb: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    from rdml.eval import clustering_metrics, retrieval_metrics

    scores = dict(clustering_metrics(emb, labels, seed=seed))
    scores["recall@1"] = retrieval_metrics(emb, labels)["recall@1"]
    return {k: float(scores[k]) for k in CLUSTER_METRICS if k in scores}


def _clustering(result: RobustnessResult, model: nn.Module, dataset: Dataset, indices: np.ndarray,
                specs: Sequence, labels_np: np.ndarray, batch_size: int, device, seed: int, progress: bool) -> None:
    """Clustering attacks on the set ``dataset[indices]``; clean embeddings use the same batching."""
    _, local = np.unique(labels_np[indices], return_inverse=True)
    labels = torch.as_tensor(local, dtype=torch.long, device=device)
    with frozen_eval(model):
        clean = embed_indices(model, dataset, indices, batch_size, device)
    for name, value in _cluster_scores(clean.cpu().numpy(), local, seed).items():
        result[f"clustering.clean.{name}"] = value
    for key, spec in specs:
        outcome = run_clustering_attack(model, dataset, indices, spec, clean, labels, key=key,
                                        batch_size=batch_size, device=device, seed=seed, progress=progress)
        result.clustering.append(outcome)
        for name, value in _cluster_scores(outcome.adv_emb, local, seed).items():
            result[f"clustering.{key}.{name}"] = value
        log.info("clustering attack %s: NMI %.3f (%d passes)", key, result.get(f"clustering.{key}.nmi", math.nan),
                 outcome.passes)
