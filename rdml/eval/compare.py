"""Evaluate a set of runs together: one result per run (with per-query values), seeds combined with
intervals, and the checks that keep a robustness table honest.

A robustness claim compares models, so a single run's numbers are not enough: :func:`evaluate_run`
keeps every per-query value next to the means (benign R@1 and AP per test item, every attack's reported
number per attacked query), :func:`combine` turns the runs of one recipe (its seeds) into means with
two-level bootstrap intervals (:mod:`rdml.eval.intervals`), and the checks say when a difference is
noise (:func:`separated`), when an ERS gain comes mostly from the absolute ES:D term
(:func:`esd_share_of_gain`) and when a model's numbers do not fall under a stronger attack
(:func:`adaptive_drop`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from rdml.attacks.ers import ers_terms
from rdml.attacks.profiles import ERS_KEYS, AttackProfile
from rdml.eval.intervals import N_BOOT, Interval, bootstrap, bootstrap_statistic, combine_seeds, t_interval

#: benign numbers that are means over test items (bootstrapped per item); the others get a t-interval over seeds
PER_ITEM_BENIGN = ("recall@1", "map")


@dataclass
class RunEvaluation:
    """One evaluated run: flat metrics (as ``rdml evaluate`` writes them) plus the per-query values."""

    name: str
    seed: int | None
    metrics: dict[str, float]
    benign_per_query: dict[str, np.ndarray] = field(default_factory=dict)
    attack_per_query: dict[str, np.ndarray] = field(default_factory=dict)
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    info: dict[str, Any] = field(default_factory=dict)
    #: the full robustness result (per-query outcomes, examples) of this session; not saved
    robustness: Any = field(default=None, repr=False, compare=False)

    @property
    def flags(self) -> list[str]:
        """Warnings a reader of these numbers must see: collapse, suspected gradient masking, ES:D-driven ERS."""
        from rdml.attacks.ers import ESD_DRIVEN_POINTS
        from rdml.eval.report_files import flags

        out = flags(self.metrics)
        if self.metrics.get("esd_driven", 0.0) >= 1.0:
            out.append(f"ES:D-DRIVEN ERS: {self.metrics.get('esd_scale_gain', math.nan):.1f} ERS points (> "
                       f"{ESD_DRIVEN_POINTS}) come from the embedding's small scale (spread "
                       f"{self.metrics.get('embedding_spread', math.nan):.3f}), not from robustness; read ES:D/spread")
        return out

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """``<stem>.json`` (metrics and info) and ``<stem>.npz`` (per-query arrays; loads without pickle).

        The suffixes are appended, never substituted: ``run.rob28`` and ``run.rob28-adaptive`` are two stems."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        js = Path(f"{stem}.json")
        js.write_text(json.dumps({"name": self.name, "seed": self.seed, "metrics": self.metrics, "info": self.info},
                                 indent=2, sort_keys=True, default=float))
        arrays = {f"benign/{k}": v for k, v in self.benign_per_query.items()}
        arrays.update({f"attack/{k}": v for k, v in self.attack_per_query.items()})
        arrays["indices"] = self.indices
        npz = Path(f"{stem}.npz")
        np.savez_compressed(npz, **arrays)
        return js, npz

    @classmethod
    def load(cls, stem: str | Path) -> RunEvaluation:
        meta = json.loads(Path(f"{stem}.json").read_text())
        with np.load(Path(f"{stem}.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(
            name=meta["name"], seed=meta["seed"], metrics=meta["metrics"], info=meta.get("info", {}),
            benign_per_query={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("benign/")},
            attack_per_query={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("attack/")},
            indices=arrays.get("indices", np.zeros(0, np.int64)),
        )


def benign_evaluation(emb: np.ndarray, labels: np.ndarray, seed: int = 0, n_boot: int = N_BOOT,
                      nmi_boot: int = 200, gallery_emb: np.ndarray | None = None,
                      gallery_labels: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Benign metrics (fractions) with intervals, and the per-item R@1 / AP they come from.

    R@1 and mAP are means over items (bootstrapped per item); NMI is re-clustered on ``nmi_boot``
    resampled item sets. With a gallery the items are the queries, searched against the gallery
    (nothing excluded), and k-means clusters the union of queries and gallery (as
    :func:`rdml.eval.metrics.benign_metrics`).
    """
    from rdml.eval.clustering import clustering_metrics
    from rdml.eval.retrieval import metrics_from_ranks, per_query_from_ranks, positive_ranks

    ranks, num_pos = positive_ranks(emb, labels, gallery_emb, gallery_labels)
    metrics = dict(metrics_from_ranks(ranks, num_pos))
    if gallery_emb is not None:
        emb = np.concatenate([np.asarray(emb), np.asarray(gallery_emb)])
        labels = np.concatenate([np.asarray(labels), np.asarray(gallery_labels)])
    metrics.update(clustering_metrics(emb, labels, seed=seed))
    per_item = per_query_from_ranks(ranks, num_pos)
    for name, iv in (bootstrap(per_item, n_boot=n_boot, seed=seed) if n_boot else {}).items():
        metrics[f"ci.{name}.low"], metrics[f"ci.{name}.high"] = iv.low, iv.high
    if nmi_boot:
        def nmi_of(idx: np.ndarray) -> float:
            return clustering_metrics(emb[idx], labels[idx], seed=seed)["nmi"]

        iv = bootstrap_statistic(nmi_of, len(labels), n_boot=nmi_boot, seed=seed)
        metrics["ci.nmi.low"], metrics["ci.nmi.high"] = iv.low, iv.high
    return metrics, per_item


def evaluate_run(model: nn.Module, dataset: Dataset, profile: str | Path | AttackProfile | None, *, name: str,
                 seed: int | None = None, attack_seed: int = 0, device: str | torch.device = "cpu",
                 batch_size: int = 256, max_queries: int | None = None, n_boot: int = N_BOOT,
                 nmi_boot: int = 200, progress: bool = False, keep_examples: int = 0,
                 kmeans_seed: int = 0, gallery: Dataset | None = None,
                 surrogate: nn.Module | None = None, executor: Any = None) -> RunEvaluation:
    """Benign metrics and (with ``profile``) the attacks of one model, every number with an interval
    (``n_boot`` bootstrap resamples; 0: no intervals).

    ``dataset`` holds the queries; without ``gallery`` they are also the gallery (each query's own
    item excluded), with ``gallery`` they search it. ``surrogate``: a worst-case profile's transfer
    source (:mod:`rdml.eval.worst_case`); ``executor``: attack workers (:mod:`rdml.eval.shards`).
    :func:`rdml.evaluate` is the public front of this
    function (tensors, any embedding model, flags, curve and masking check).
    """
    from rdml.attacks.inputs import dataset_labels
    from rdml.eval.embed import embed
    from rdml.eval.robustness import evaluate_robustness

    emb, labels = embed(model, dataset, batch_size=batch_size, device=device)
    g_emb = g_labels = None
    if gallery is not None:
        g_emb, g_labels = embed(model, gallery, batch_size=batch_size, device=device)
    metrics, benign_pq = benign_evaluation(emb, labels, seed=kmeans_seed, n_boot=n_boot,
                                           nmi_boot=nmi_boot if n_boot else 0, gallery_emb=g_emb,
                                           gallery_labels=g_labels)
    result = RunEvaluation(name, seed, metrics, benign_per_query=benign_pq)
    if profile is None:
        return result
    database = (torch.from_numpy(emb), dataset_labels(dataset)) if gallery is None else \
        (torch.from_numpy(g_emb), dataset_labels(gallery))
    rob = evaluate_robustness(model, dataset, profile, device=device, seed=attack_seed, max_queries=max_queries,
                              batch_size=batch_size, progress=progress, intervals=n_boot, keep_examples=keep_examples,
                              database=database, gallery=gallery, surrogate=surrogate, executor=executor)
    result.metrics.update({k: float(v) for k, v in rob.items()})
    result.attack_per_query = rob.per_query_metrics()
    result.indices = rob.indices
    result.info["passes"] = rob.passes
    result.info["seconds"] = rob.seconds
    result.robustness = rob
    return result


def _ers_functions(names: Sequence[str]) -> dict[str, Any]:
    """ERS of every complete group of the ten ERS attacks among per-query metric names ('' and 'P/' prefixes)."""
    from rdml.attacks.ers import ers

    prefixes = {n[: -len(k)] for n in names for k in ERS_KEYS if n.endswith(k)}
    out = {}
    for p in sorted(prefixes):
        if (not p or p.endswith("/")) and all(f"{p}{k}" in names for k in ERS_KEYS):
            out["ers" if not p else f"ers.{p.rstrip('/')}"] = (lambda means, p=p: ers({k: means[f"{p}{k}"]
                                                                                        for k in ERS_KEYS}))
    return out


def combine(runs: Sequence[RunEvaluation], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Interval]:
    """Every metric of a group of runs (the seeds of one recipe): mean over runs and a 95% interval.

    Per-item benign metrics and per-query attack metrics (and ERS) get the two-level bootstrap of
    :func:`rdml.eval.intervals.combine_seeds`; the other scalars (NMI, ARI, ...) a t-interval over runs.
    Keys are the flat metric names (``recall@1``, ``attacks.CA+``, ``ers``...). With one run the
    intervals are that run's own bootstrap intervals.
    """
    if not runs:
        return {}
    out: dict[str, Interval] = {}
    if len(runs) == 1:
        m = runs[0].metrics
        for key, value in m.items():
            if key.startswith("ci.") or not isinstance(value, (int, float)):
                continue
            lo, hi = m.get(f"ci.{key}.low", math.nan), m.get(f"ci.{key}.high", math.nan)
            out[key] = Interval(float(value), float(lo), float(hi))
        return out
    benign = [r.benign_per_query for r in runs if r.benign_per_query]
    if len(benign) == len(runs):
        for name, iv in combine_seeds(benign, n_boot=n_boot, seed=seed).items():
            out[name] = iv
    attacks = [r.attack_per_query for r in runs if r.attack_per_query]
    if len(attacks) == len(runs):
        common = [k for k in attacks[0] if all(k in a for a in attacks)]
        attacks = [{k: a[k] for k in common} for a in attacks]
        for name, iv in combine_seeds(attacks, _ers_functions(common), n_boot=n_boot, seed=seed).items():
            out[name if name.startswith("ers") else f"attacks.{name}"] = iv
    for key in runs[0].metrics:
        if key in out or key.startswith("ci.") or key in PER_ITEM_BENIGN:
            continue
        values = [r.metrics.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values):
            out[key] = _within_range(key, t_interval([float(v) for v in values]))
    return out


def _within_range(key: str, iv: Interval) -> Interval:
    """A t-interval over few seeds can leave the metric's range (NMI above 1 with two seeds): clip a
    fraction's interval to [0, 1]; the interval stays honest about its width inside the range."""
    from rdml.metrics import FRACTION, lookup

    try:
        spec = lookup(key)
    except KeyError:
        return iv
    if spec.unit != FRACTION:
        return iv
    return Interval(iv.value, max(iv.low, 0.0), min(iv.high, 1.0))


def separated(a: Interval, b: Interval) -> bool:
    """True when two 95% intervals do not overlap (a difference the data supports)."""
    return not a.overlaps(b)


def esd_share_of_gain(metrics: Mapping[str, float], reference: Mapping[str, float], prefix: str = "") -> float | None:
    """The part of the ERS gain over ``reference`` that comes from the ES:D term alone (a fraction).

    ERS is the mean of ten terms; ES:D's term, 100 (2 - ES:D) / 2, rewards a small absolute shift, which
    shrinking the embedding buys without robustness. None when the model does not gain ERS.
    """
    try:
        mine = ers_terms({k: metrics[f"attacks.{prefix}{k}"] for k in ERS_KEYS})
        ref = ers_terms({k: reference[f"attacks.{prefix}{k}"] for k in ERS_KEYS})
    except KeyError:
        return None
    gain = (sum(mine.values()) - sum(ref.values())) / len(ERS_KEYS)
    if not gain > 0:
        return None
    return (mine["ES:D"] - ref["ES:D"]) / len(ERS_KEYS) / gain


def adaptive_drop(base: RunEvaluation, adaptive: RunEvaluation, n_boot: int = N_BOOT, seed: int = 0
                  ) -> dict[str, Interval]:
    """Paired change of ERS (and of every ERS attack) from ``base`` to ``adaptive`` on the same queries.

    ``adaptive`` attacked a subset of ``base``'s queries; the base values are taken on that subset, and
    the difference (adaptive - base, in each metric's own unit) gets a paired bootstrap interval.
    Robust attacks should make ERS *fall* (a negative difference); a model whose ERS does not fall under
    4x the steps and random restarts is suspect of masking gradients.
    """
    pos = {int(q): i for i, q in enumerate(base.indices)}
    rows = np.array([pos[int(q)] for q in adaptive.indices])
    names = [k for k in ERS_KEYS if k in adaptive.attack_per_query and k in base.attack_per_query]
    table = {f"base/{k}": base.attack_per_query[k][rows] for k in names}
    table.update({f"adaptive/{k}": adaptive.attack_per_query[k] for k in names})
    derived = {}
    from rdml.attacks.ers import ers

    if len(names) == len(ERS_KEYS):
        derived["ers"] = lambda m: ers({k: m[f"adaptive/{k}"] for k in ERS_KEYS}) - ers({k: m[f"base/{k}"]
                                                                                      for k in ERS_KEYS})
    for k in names:
        derived[k] = lambda m, k=k: m[f"adaptive/{k}"] - m[f"base/{k}"]
    ivs = bootstrap(table, derived, n_boot=n_boot, seed=seed)
    return {k: ivs[k] for k in derived}
