"""The one metric registry: every number rdml reports, its unit, the direction that is good, how it is shown.

Unit convention (stated once, here and in the README): results are stored in their natural units.

* ``fraction``: rates, recalls and rank percentiles in [0, 1] (R@1, mAP, NMI, CA+/-, QA+/-, ES:R, LTM,
  GTM, GTT, Panum's adversarial R@1);
* ``cosine``: TMA's cosine similarity in [-1, 1];
* ``distance``: Euclidean distance between embeddings (ES:D; [0, 2] on the unit sphere);
* ``ratio``: a dimensionless ratio (ES:D divided by the embedding spread);
* ``points``: ERS, on the 0-100 scale of the papers;
* ``count``: counts and ranks (the worst-case rank of a query's true match, flags).

Percent appears only at display time (:meth:`MetricSpec.show`, the paper-style tables). JSON files,
MLflow metrics and every check use the stored units, and every check reads its direction and its
tolerance from here, so a fraction and a percent can never be compared by mistake.

Every ranking attack declares the metrics it reports next to its code (``reports`` of the classes in
:mod:`rdml.attacks.ranking`; clustering attacks report the benign clustering metrics of the attacked
set); this module holds the benign metrics and collects the rest. :func:`lookup` resolves any flat result key (``attacks.2eps/CA+``,
``clustering.centroid_kmeans.nmi``, ``ci.ers.low``, ``eval/recall@1``) to its spec, and refuses keys
nobody declared: an unlisted attack never silently counts as "higher is robust".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

FRACTION, COSINE, DISTANCE, RATIO, POINTS, COUNT = "fraction", "cosine", "distance", "ratio", "points", "count"
UNITS = (FRACTION, COSINE, DISTANCE, RATIO, POINTS, COUNT)
HIGHER, LOWER = "higher", "lower"

#: smallest change that counts as a real difference in a check (for one run; intervals do better)
TOLERANCE = {FRACTION: 0.01, COSINE: 0.01, DISTANCE: 0.02, RATIO: 0.02, POINTS: 1.0, COUNT: 1.0}


@dataclass(frozen=True)
class MetricSpec:
    """One reported number: its name, unit, the direction that is good (robust, for attack outcomes),
    the value a perfect attacker reaches (``worst``) and a one-line meaning."""

    name: str
    unit: str
    good: str | None  # HIGHER, LOWER, or None for diagnostics without a direction
    title: str
    worst: float | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"metric {self.name}: unknown unit {self.unit!r}; one of {UNITS}")
        if self.good not in (HIGHER, LOWER, None):
            raise ValueError(f"metric {self.name}: good must be higher, lower or None")

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.unit]

    def better(self, a: float, b: float) -> float:
        """How much better ``a`` is than ``b`` for the defender (positive: better), in the metric's unit."""
        if self.good is None:
            raise ValueError(f"metric {self.name} has no direction")
        return a - b if self.good == HIGHER else b - a

    def show(self, value: float | None, paper: bool = True) -> str:
        """The display form: fractions as percent (paper style) with one decimal, cosines/distances with three."""
        if value is None or value != value:
            return "—"
        if self.unit == FRACTION and paper:
            return f"{100 * value:.1f}"
        if self.unit in (COSINE, DISTANCE, RATIO):
            return f"{value:.3f}"
        if self.unit == COUNT:
            return f"{value:.0f}"
        return f"{value:.1f}" if self.unit == POINTS else f"{value:.4f}"

    @property
    def arrow(self) -> str:
        return {HIGHER: "↑", LOWER: "↓", None: ""}[self.good]

    @property
    def label(self) -> str:
        """Column label with the unit for display (``R@1 (%)``, ``TMA (cos)``)."""
        suffix = {FRACTION: " (%)", COSINE: " (cos)", DISTANCE: " (dist)", RATIO: "", POINTS: "", COUNT: ""}[self.unit]
        return f"{self.name}{suffix}"


BENIGN = {
    **{f"recall@{k}": MetricSpec(f"recall@{k}", FRACTION, HIGHER, f"R@{k}: a same-class item among the top {k}")
       for k in (1, 2, 4, 8)},
    "map": MetricSpec("map", FRACTION, HIGHER, "mean average precision over all positives"),
    "map@r": MetricSpec("map@r", FRACTION, HIGHER, "Musgrave's mAP@R (R = number of positives)"),
    "nmi": MetricSpec("nmi", FRACTION, HIGHER, "normalised mutual information of k-means vs labels", worst=0.0),
    "ari": MetricSpec("ari", FRACTION, HIGHER, "adjusted Rand index of k-means vs labels", worst=0.0),
    "cluster_acc": MetricSpec("cluster_acc", FRACTION, HIGHER, "clustering accuracy (Hungarian matching)"),
    "cluster_f1": MetricSpec("cluster_f1", FRACTION, HIGHER, "pairwise clustering F1"),
}
SUMMARY = {
    "ers": MetricSpec("ers", POINTS, HIGHER, "Empirical Robustness Score (mean of ten normalised attacks)"),
    "embedding_spread": MetricSpec("embedding_spread", DISTANCE, None, "RMS pairwise distance of the clean test embedding"),
    "collapse": MetricSpec("collapse", COUNT, None, "1 when the model collapsed (R@1 < 5% or spread < 0.05)"),
    "esd_scale_gain": MetricSpec("esd_scale_gain", POINTS, None,
                                 "ERS points the ES:D term owes to the embedding's small scale (rdml.attacks.ers)"),
    "esd_driven": MetricSpec("esd_driven", COUNT, None, "1 when more than 5 ERS points come from the scale (ES:D term)"),
    # the worst-case suite (rdml.eval.worst_case): per attacked item the worst over the suite, then the mean
    **{f"worst{group}.{m}": MetricSpec(f"worst{group}.{m}", unit, good, f"{title}, worst case over {what}", worst)
       for group, what in (("", "the suite"), (".whitebox", "the white-box attacks"),
                           (".blackbox", "the black-box search"), (".transfer", "the transfer attacks"))
       for m, unit, good, title, worst in (
           ("recall@1", FRACTION, HIGHER, "R@1 of the attacked item as a query", 0.0),
           ("map", FRACTION, HIGHER, "AP of the attacked item as a query", 0.0),
           ("rank", COUNT, LOWER, "rank of the attacked item's true match (its nearest positive)", None))},
    "worst.masking": MetricSpec("worst.masking", COUNT, None,
                                "1 when a black-box or transfer attack beat the white-box suite (masked gradients)"),
}
_KEY = re.compile(r"^(?:ci\.)?(?P<body>.+?)(?:\.(?:low|high))?$")


@lru_cache(maxsize=1)
def registry() -> dict[str, MetricSpec]:
    """Every declared metric by name: benign, summary, and what every attack class reports."""
    from rdml.attacks.ranking import ATTACKS

    out = {**BENIGN, **SUMMARY}
    for cls in ATTACKS.values():  # clustering attacks report the benign clustering metrics of the attacked set
        out.update(cls.reports)
    return out


def lookup(key: str) -> MetricSpec:
    """The spec of any flat result key; :class:`KeyError` naming the key when nobody declared it."""
    body = _KEY.match(key)["body"] if key.startswith("ci.") else key
    for prefix in ("final/", "eval/", "adaptive.", "drop."):
        body = body.removeprefix(prefix)
    reg = registry()
    if body.startswith("attacks."):
        body = body[len("attacks."):]
        if body not in reg and "/" in body and body.split("/", 1)[1] in reg:
            body = body.split("/", 1)[1]  # a group of a profile: 2eps/CA+
        if body not in reg and ":" in body and body.split(":", 1)[0] in reg:
            body = body.split(":", 1)[0]  # profile keys that repeat an attack (CA+:W=2:eps=0.0314)
    elif body.startswith("clustering."):
        body = body.rsplit(".", 1)[-1]
    elif body.startswith("ers."):
        body = "ers"
    elif body.startswith("curve."):
        body = body.split(".")[1]
    if body in reg:
        return reg[body]
    raise KeyError(f"metric {key!r} is not declared in rdml's metric registry (rdml/metrics.py and the attacks' "
                   "`reports`); declare its unit and direction there")


def show(key: str, value, paper: bool = True) -> str:
    """Display form of any flat result value (``—`` for NaN/None; strings as they are)."""
    if value is None or isinstance(value, str):
        return "—" if value is None else value
    try:
        return lookup(key).show(float(value), paper)
    except KeyError:
        return f"{float(value):.4g}"


def show_interval(metrics, key: str, paper: bool = True) -> str:
    """``value [low, high]`` from a flat dict holding ``key`` and its ``ci.<key>.low/high`` (value alone if none)."""
    value = metrics.get(key)
    lo, hi = metrics.get(f"ci.{key}.low"), metrics.get(f"ci.{key}.high")
    text = show(key, value, paper)
    if lo is None or hi is None or lo != lo or hi != hi:
        return text
    return f"{text} [{show(key, lo, paper)}, {show(key, hi, paper)}]"
