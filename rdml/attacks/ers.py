"""The Empirical Robustness Score (ERS) of RobRank (hm-robrank.md section 3).

ERS is the plain mean of the 10 ERS-profile attack outcomes, each mapped so that 100 means "the
attack had no effect" and higher is better:

    ERS = (2 CA+ + (100 - CA-) + 2 QA+ + (100 - QA-) + 100 (1 - TMA) + 100 (2 - ES:D) / 2
           + ES:R + LTM + GTM + GTT) / 10

with CA+/-, QA+/- rank percentiles in %, TMA a cosine, ES:D a distance on the unit sphere, and
ES:R / LTM / GTM R@1 and GTT retain@4 in %. The 2x terms are not capped. A collapsed model scores well
on several terms (ES:D = 0, QA+ near 50), so ERS must always be read next to R@1 (see
:func:`is_collapsed`).
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

    ``metrics`` holds the raw outcomes under ``CA+`` ... ``GTT`` or ``attacks.CA+`` ...
    """
    missing = [k for k in ERS_KEYS if k not in metrics and f"attacks.{k}" not in metrics]
    if missing:
        raise KeyError(f"ERS needs all of {', '.join(ERS_KEYS)}; missing {', '.join(missing)}")
    v = {k: _get(metrics, k) for k in ERS_KEYS}
    return {
        "CA+": 2.0 * v["CA+"],
        "CA-": 100.0 - v["CA-"],
        "QA+": 2.0 * v["QA+"],
        "QA-": 100.0 - v["QA-"],
        "TMA": 100.0 * (1.0 - v["TMA"]),
        "ES:D": 100.0 * (2.0 - v["ES:D"]) / 2.0,
        "ES:R": v["ES:R"],
        "LTM": v["LTM"],
        "GTM": v["GTM"],
        "GTT": v["GTT"],
    }


def ers(metrics: Mapping[str, float]) -> float:
    """ERS from the 10 raw attack outcomes (percent units as reported; TMA cosine; ES:D distance)."""
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

    Either way such a model's ERS is meaningless (spec hm-robrank.md §3, weakness ii).
    """
    return recall_at_1 < COLLAPSE_R1 or (spread is not None and spread < COLLAPSE_SPREAD)
