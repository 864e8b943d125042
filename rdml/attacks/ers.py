"""The Empirical Robustness Score (ERS) of RobRank, on rdml's units.

ERS is the plain mean of the 10 ERS-profile attack outcomes, each mapped so that 100 means "the
attack had no effect" and higher is better. With the outcomes in rdml's units (:mod:`rdml.metrics`:
CA+/-, QA+/- rank percentiles and ES:R / LTM / GTM R@1 and GTT retain@4 as fractions, TMA a cosine,
ES:D a distance on the unit sphere) the terms are

    ERS = (200 CA+ + 100 (1 - CA-) + 200 QA+ + 100 (1 - QA-) + 100 (1 - TMA) + 100 (2 - ES:D) / 2
           + 100 ES:R + 100 LTM + 100 GTM + 100 GTT) / 10

in points, which is the published formula on the papers' percentages. The 2x terms are not capped. A
collapsed model scores well on several terms (ES:D = 0, QA+ near 0.5), so ERS must always be read next
to R@1 (see :func:`is_collapsed`); ES:D is an absolute distance, so a shrunk embedding scores well too
(see ``attacks.ES:D/spread`` in :mod:`rdml.eval.robustness`).

Published ERS values come from robrank's GTM, whose target-indexing bug (it picks a position inside a
label-masked subset and uses it as a global index) makes GTM *stronger*; rdml's fixed GTM is weaker, so
rdml's ERS is somewhat higher than the reference code's on the same model (0.9-2.4 points measured on
digits models). Say so wherever rdml's ERS is put beside a published number.
"""

from __future__ import annotations

from collections.abc import Mapping

from rdml.attacks.profiles import ERS_KEYS

COLLAPSE_R1 = 0.05
"""Benign R@1 (fraction) below which a model counts as collapsed, whatever its ERS."""

COLLAPSE_SPREAD = 0.05
"""RMS pairwise distance of the test embeddings below which a model counts as collapsed.

Min-max training can shrink the whole embedding into a tiny cap of the unit sphere: ranking still works
(R@1 stays high) but every attack that needs the embedding to *move* reports success or failure for
the wrong reason (ES:D ~ 0, TMA ~ 1) and ERS is inflated. Healthy models spread over ~1.
"""


def _get(metrics: Mapping[str, float], key: str) -> float:
    for name in (key, f"attacks.{key}"):
        if name in metrics:
            return float(metrics[name])
    raise KeyError(key)


def ers_terms(metrics: Mapping[str, float]) -> dict[str, float]:
    """The 10 normalised terms (each ~100 when the attack has no effect) keyed by attack name.

    ``metrics`` holds the outcomes (rdml's units) under ``CA+`` ... ``GTT`` or ``attacks.CA+`` ...
    """
    missing = [k for k in ERS_KEYS if k not in metrics and f"attacks.{k}" not in metrics]
    if missing:
        raise KeyError(f"ERS needs all of {', '.join(ERS_KEYS)}; missing {', '.join(missing)}")
    v = {k: _get(metrics, k) for k in ERS_KEYS}
    return {
        "CA+": 200.0 * v["CA+"],
        "CA-": 100.0 * (1.0 - v["CA-"]),
        "QA+": 200.0 * v["QA+"],
        "QA-": 100.0 * (1.0 - v["QA-"]),
        "TMA": 100.0 * (1.0 - v["TMA"]),
        "ES:D": 100.0 * (2.0 - v["ES:D"]) / 2.0,
        "ES:R": 100.0 * v["ES:R"],
        "LTM": 100.0 * v["LTM"],
        "GTM": 100.0 * v["GTM"],
        "GTT": 100.0 * v["GTT"],
    }


def ers(metrics: Mapping[str, float]) -> float:
    """ERS in points from the 10 attack outcomes in rdml's units (fractions; TMA cosine; ES:D distance)."""
    return sum(ers_terms(metrics).values()) / len(ERS_KEYS)


def embedding_spread(emb) -> float:
    """RMS pairwise Euclidean distance of a set of embeddings, in O(n): 2·mean‖e‖² − 2‖mean e‖²."""
    import numpy as np

    e = np.asarray(emb, dtype=np.float64)
    mean_sq = float((e * e).sum(axis=1).mean())
    centre = e.mean(axis=0)
    return float(np.sqrt(max(0.0, 2.0 * mean_sq - 2.0 * float(centre @ centre))))


def is_collapsed(recall_at_1: float, spread: float | None = None) -> bool:
    """True when benign R@1 (a fraction) is below 5% or the embedding spread is below COLLAPSE_SPREAD.

    Either way such a model's ERS is meaningless (docs/methods.md#ers-weaknesses).
    """
    return recall_at_1 < COLLAPSE_R1 or (spread is not None and spread < COLLAPSE_SPREAD)


SPHERE_SPREAD = 2 ** 0.5
"""RMS pairwise distance of unit vectors with zero mean (spread evenly over the sphere): sqrt(2)."""

ESD_DRIVEN_POINTS = 5.0
"""ERS points the ES:D term may owe to the embedding's scale before an ERS counts as ES:D-driven (half of the
term's 10-point range; a healthy model whose classes fill part of the sphere owes it about 1-3 points)."""


def _esd_term(esd: float) -> float:
    return 100.0 * (2.0 - min(float(esd), 2.0)) / 2.0 / len(ERS_KEYS)


def esd_scale_gain(esd: float, spread: float) -> float:
    """ERS points the ES:D term gains from the embedding's *scale* alone.

    ES:D is an absolute distance: an embedding that fills only a small cap of the sphere (small spread)
    moves little in absolute terms however badly it is attacked, and its ES:D term is high. Measured
    relative to the embedding's own spread and rescaled to a zero-mean unit-sphere spread (sqrt(2)),
    ES:D becomes scale-free; the difference of the two ES:D terms (in ERS points) is what the scale
    alone bought. About 0 for a well spread embedding; up to 10 for a shrunk one.
    """
    if not spread > 0:
        return float("nan")
    return _esd_term(esd) - _esd_term(esd / spread * SPHERE_SPREAD)


def is_esd_driven(esd: float, spread: float) -> bool:
    """True when more than :data:`ESD_DRIVEN_POINTS` of the ERS come from the embedding's scale (ES:D term)."""
    gain = esd_scale_gain(esd, spread)
    return gain == gain and gain > ESD_DRIVEN_POINTS
