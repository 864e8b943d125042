"""Bootstrap 95% intervals: over the queries of one run, and over seeds and queries of several runs.

Why the bootstrap: every robustness number rdml reports is a mean over test queries (a percentile, an
R@1 indicator, a cosine, a distance), and ERS is a fixed linear combination of ten such means. One
resampling of the queries, shared by every metric, therefore gives the joint sampling distribution of
all of them and of ERS at once (a per-metric interval would ignore that the ten attacks see the same
queries). Intervals are percentile intervals of ``n_boot`` resamples (default 1000) drawn from a seeded
generator, so a run's intervals are reproducible.

Several seeds (runs of the same recipe) are combined with a two-level bootstrap: each resample draws
the seeds with replacement and then the queries within every drawn seed; the statistic is the mean
over the drawn seeds. The interval thus reflects both the training randomness (seed to seed) and the
finite test set. With three seeds the seed level is coarse; the point estimate is the plain mean over
seeds.

Metrics that are not means over queries (NMI, which needs a clustering of the whole set) go through
:func:`bootstrap_statistic`, which re-evaluates a function on resampled query sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 1000
LEVEL = 0.95

Derived = Callable[[Mapping[str, float]], float]
"""A number computed from the means of per-query metrics (e.g. ERS from the ten attack means)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (same unit as the metric)."""

    value: float
    low: float
    high: float

    def overlaps(self, other: Interval) -> bool:
        return not (self.high < other.low or other.high < self.low)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` indices drawn with replacement (one row per resample)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap(per_query: Mapping[str, np.ndarray], derived: Mapping[str, Derived] | None = None,
              n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict[str, Interval]:
    """Intervals of the means of aligned per-query arrays, and of numbers derived from those means.

    ``per_query[name]`` holds one value per query, all arrays over the same queries in the same order
    (NaN entries are ignored: a metric defined on a subset of the queries, e.g. GTM on the correctly
    retrieved ones, is NaN elsewhere). ``derived[name](means)`` is evaluated on the point means and on
    every resample's means.
    """
    names = list(per_query)
    if not names:
        return {}
    n = len(per_query[names[0]])
    if any(len(per_query[k]) != n for k in names):
        raise ValueError("per-query arrays must all cover the same queries")
    table = np.stack([np.asarray(per_query[k], dtype=np.float64) for k in names])  # [m, n]
    point = {k: float(np.nanmean(row)) if np.isfinite(row).any() else float("nan") for k, row in zip(names, table, strict=True)}
    if n == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return {k: nan for k in [*names, *(derived or {})]}
    idx = resample_indices(n, n_boot, seed)
    with np.errstate(invalid="ignore"), _quiet():
        means = np.nanmean(table[:, idx], axis=2)  # [m, n_boot]
    out = {k: Interval(point[k], *_percentiles(means[i], level)) for i, k in enumerate(names)}
    for name, fn in (derived or {}).items():
        samples = np.array([fn(dict(zip(names, means[:, b], strict=True))) for b in range(n_boot)])
        out[name] = Interval(fn(point), *_percentiles(samples, level))
    return out


def bootstrap_statistic(fn: Callable[[np.ndarray], float], n: int, n_boot: int = 200, seed: int = 0,
                        level: float = LEVEL) -> Interval:
    """Interval of ``fn(indices)`` over resampled query sets (``fn(np.arange(n))`` is the point estimate)."""
    samples = np.array([fn(row) for row in resample_indices(n, n_boot, seed)])
    return Interval(float(fn(np.arange(n))), *_percentiles(samples, level))


def combine_seeds(runs: Sequence[Mapping[str, np.ndarray]], derived: Mapping[str, Derived] | None = None,
                  n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict[str, Interval]:
    """Mean over runs (seeds) with a two-level bootstrap interval (seeds, then queries within each seed).

    Each element of ``runs`` maps metric names to per-query arrays of one run (runs may have different
    numbers of queries). Derived numbers are computed per run and averaged, which for ERS (linear in
    the means) equals ERS of the averaged means.
    """
    if not runs:
        return {}
    names = list(runs[0])
    k = len(runs)
    rng = np.random.default_rng(seed)
    per_run_boot: list[np.ndarray] = []  # [m, n_boot] resampled means of each run
    per_run_point: list[dict[str, float]] = []
    for r, run in enumerate(runs):
        table = np.stack([np.asarray(run[name], dtype=np.float64) for name in names])
        idx = resample_indices(table.shape[1], n_boot, seed + 1 + r)
        with np.errstate(invalid="ignore"), _quiet():
            per_run_boot.append(np.nanmean(table[:, idx], axis=2))
            per_run_point.append({name: float(np.nanmean(row)) for name, row in zip(names, table, strict=True)})
    picks = rng.integers(0, k, size=(n_boot, k))  # seeds drawn with replacement, per resample
    stacked = np.stack(per_run_boot)  # [k, m, n_boot]
    boot = stacked[picks, :, np.arange(n_boot)[:, None]].mean(axis=1)  # [n_boot, m]
    point = {name: float(np.mean([p[name] for p in per_run_point])) for name in names}
    out = {name: Interval(point[name], *_percentiles(boot[:, i], level)) for i, name in enumerate(names)}
    for name, fn in (derived or {}).items():
        per_run_derived = np.array([[fn(dict(zip(names, per_run_boot[r][:, b], strict=True))) for b in range(n_boot)]
                                    for r in range(k)])  # [k, n_boot]
        samples = per_run_derived[picks, np.arange(n_boot)[:, None]].mean(axis=1)
        out[name] = Interval(float(np.mean([fn(p) for p in per_run_point])), *_percentiles(samples, level))
    return out


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval of a few independent numbers (e.g. one final metric per seed)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half)


class _quiet:
    """Silence numpy's 'Mean of empty slice' warnings (all-NaN resamples give NaN, which is what we want)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
