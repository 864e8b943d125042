"""ERS against the paper's printed tables (printed in percent; rdml stores fractions, see rdml.metrics)."""

from __future__ import annotations

import pytest

from rdml.attacks.ers import embedding_spread, ers, ers_terms, is_collapsed
from rdml.attacks.profiles import ERS_KEYS

# (dataset, defense, training eta, (CA+, CA-, QA+, QA-, TMA, ES:D, ES:R, LTM, GTM, GTT) as printed, printed ERS)
T_SOTA = [
    ("CUB", "N/A[R]", 'N/A', (0.0, 100.0, 0.0, 99.9, 0.883, 1.762, 0.0, 0.0, 14.1, 0.0), 3.8),
    ("CUB", "EST[R]", '8', (0.5, 97.3, 0.5, 91.3, 0.875, 1.325, 3.9, 0.4, 14.9, 0.0), 7.9),
    ("CUB", "ACT[R]", '8', (13.7, 46.8, 12.6, 39.3, 0.547, 0.902, 13.6, 9.8, 21.9, 1.3), 31.3),
    ("CUB", "HM[S,g_LGA]", '8', (12.7, 46.4, 11.6, 39.9, 0.567, 0.783, 16.8, 11.9, 27.9, 1.4), 32.4),
    ("CUB", "HM[S,g_LGA]&ICS", '8', (12.9, 40.9, 14.7, 33.7, 0.806, 0.487, 17.1, 13.2, 26.3, 2.3), 33.5),
    ("CUB", "EST[R]", '32', (2.7, 97.9, 0.4, 97.3, 0.848, 1.576, 1.4, 0.0, 4.0, 0.0), 5.3),
    ("CUB", "ACT[R]", '32', (15.5, 37.7, 15.1, 32.2, 0.472, 0.821, 11.1, 9.4, 14.9, 1.0), 33.9),
    ("CUB", "HM[S,g_LGA]", '32', (14.7, 39.6, 15.6, 34.2, 0.523, 0.736, 16.5, 15.0, 26.7, 2.9), 35.9),
    ("CUB", "HM[S,g_LGA]&ICS", '32', (15.5, 37.7, 16.6, 30.9, 0.753, 0.506, 17.9, 16.7, 27.3, 2.9), 36.0),
    ("CARS", "N/A[R]", 'N/A', (0.2, 100.0, 0.1, 99.6, 0.874, 1.816, 0.0, 0.0, 13.4, 0.0), 3.6),
    ("CARS", "EST[R]", '8', (0.1, 99.9, 0.1, 98.1, 0.902, 1.681, 0.7, 0.2, 15.4, 0.0), 4.4),
    ("CARS", "ACT[R]", '8', (19.3, 33.1, 20.3, 32.3, 0.413, 0.760, 18.4, 15.0, 28.6, 1.2), 39.8),
    ("CARS", "HM[S,g_LGA]", '8', (15.3, 32.0, 17.9, 33.9, 0.463, 0.653, 23.4, 28.5, 44.6, 5.8), 42.4),
    ("CARS", "HM[S,g_LGA]&ICS", '8', (21.0, 23.3, 23.1, 22.2, 0.698, 0.415, 31.2, 38.0, 47.8, 9.6), 47.9),
    ("CARS", "EST[R]", '32', (1.2, 98.1, 0.4, 91.8, 0.880, 1.281, 2.9, 0.7, 8.2, 0.0), 7.3),
    ("CARS", "ACT[R]", '32', (18.0, 32.3, 17.5, 30.5, 0.383, 0.763, 16.3, 15.3, 20.7, 1.6), 38.6),
    ("CARS", "HM[S,g_LGA]", '32', (17.4, 28.2, 18.2, 28.8, 0.426, 0.613, 27.1, 30.7, 42.3, 7.9), 44.9),
    ("CARS", "HM[S,g_LGA]&ICS", '32', (19.3, 25.9, 19.6, 25.7, 0.650, 0.446, 30.3, 36.7, 46.0, 8.8), 46.0),
    ("SOP", "N/A[R]", 'N/A', (0.1, 99.3, 0.2, 99.1, 0.845, 1.685, 0.0, 0.0, 6.3, 0.0), 4.0),
    ("SOP", "EST[R]", '8', (6.4, 69.7, 3.9, 64.6, 0.611, 1.053, 3.8, 2.2, 10.2, 1.3), 19.0),
    ("SOP", "ACT[R]", '8', (24.8, 10.7, 25.4, 8.2, 0.321, 0.485, 15.4, 17.7, 25.1, 11.3), 49.5),
    ("SOP", "HM[S,g_LGA]", '8', (29.9, 4.7, 31.6, 3.6, 0.455, 0.283, 39.3, 40.9, 38.8, 43.0), 61.7),
    ("SOP", "HM[S,g_LGA]&ICS", '8', (32.5, 4.8, 32.4, 3.5, 0.586, 0.239, 38.6, 39.8, 38.3, 44.5), 61.2),
    ("SOP", "EST[R]", '32', (12.5, 43.6, 10.6, 34.8, 0.468, 0.830, 9.6, 7.2, 17.3, 3.8), 31.7),
    ("SOP", "ACT[R]", '32', (24.1, 10.5, 22.7, 9.4, 0.253, 0.532, 21.2, 21.6, 27.8, 15.3), 50.8),
    ("SOP", "HM[S,g_LGA]", '32', (30.6, 4.7, 31.2, 3.5, 0.466, 0.266, 38.6, 40.3, 38.6, 44.3), 61.8),
    ("SOP", "HM[S,g_LGA]&ICS", '32', (32.0, 4.2, 33.7, 3.0, 0.606, 0.207, 39.1, 39.8, 37.9, 45.6), 61.6),
]

T_HMEFF = [
    ("CUB", "N/A[R]", 'N/A', (0.0, 100.0, 0.0, 99.9, 0.883, 1.762, 0.0, 0.0, 14.1, 0.0), 3.8),
    ("CUB", "ACT[R]", '2', (0.6, 98.9, 0.4, 98.1, 0.837, 1.666, 0.2, 0.2, 19.6, 0.0), 5.8),
    ("CUB", "ACT[R]", '4', (4.6, 81.9, 2.8, 80.5, 0.695, 1.366, 2.9, 2.3, 18.8, 0.1), 13.9),
    ("CUB", "ACT[R]", '8', (13.7, 46.8, 12.6, 39.3, 0.547, 0.902, 13.6, 9.8, 21.9, 1.3), 31.3),
    ("CUB", "ACT[R]", '16', (15.8, 37.9, 16.0, 31.5, 0.496, 0.834, 11.3, 9.8, 21.2, 2.1), 34.7),
    ("CUB", "ACT[R]", '32', (15.5, 37.7, 15.1, 32.2, 0.472, 0.821, 11.1, 9.4, 14.9, 1.0), 33.9),
    ("CUB", "ACT[S]", '2', (0.0, 100.0, 0.0, 99.8, 0.877, 1.637, 0.0, 0.0, 20.4, 0.0), 5.1),
    ("CUB", "ACT[S]", '4', (0.6, 97.6, 0.2, 98.1, 0.799, 1.485, 0.3, 0.2, 18.9, 0.0), 7.1),
    ("CUB", "ACT[S]", '8', (4.8, 72.8, 2.7, 73.3, 0.619, 1.148, 8.3, 4.9, 23.5, 0.3), 18.7),
    ("CUB", "ACT[S]", '16', (6.7, 62.1, 4.9, 60.6, 0.566, 1.014, 12.4, 8.6, 22.5, 0.9), 23.7),
    ("CUB", "ACT[S]", '32', (6.8, 61.5, 5.2, 60.4, 0.506, 1.032, 12.8, 11.3, 17.7, 0.3), 24.2),
    ("CUB", "HM[R,M]", '2', (7.7, 77.5, 6.5, 70.8, 0.636, 1.281, 4.3, 2.6, 21.1, 0.2), 18.1),
    ("CUB", "HM[R,M]", '4', (13.9, 60.4, 13.5, 48.1, 0.582, 1.041, 6.6, 6.6, 20.2, 1.2), 27.1),
    ("CUB", "HM[R,M]", '8', (19.4, 48.0, 22.2, 32.0, 0.535, 0.867, 11.6, 10.4, 19.3, 2.9), 35.1),
    ("CUB", "HM[R,M]", '16', (20.9, 45.0, 24.6, 28.6, 0.494, 0.805, 15.6, 11.3, 22.1, 3.2), 38.0),
    ("CUB", "HM[R,M]", '32', (22.8, 46.0, 24.3, 28.3, 0.495, 0.800, 14.2, 11.7, 19.7, 3.8), 38.0),
    ("CUB", "HM[S,M]", '2', (1.9, 87.7, 1.6, 88.8, 0.827, 1.101, 3.7, 0.3, 19.0, 0.0), 11.6),
    ("CUB", "HM[S,M]", '4', (7.3, 64.1, 6.3, 60.9, 0.715, 0.894, 7.9, 4.4, 22.8, 0.2), 22.1),
    ("CUB", "HM[S,M]", '8', (10.9, 50.5, 10.8, 44.6, 0.680, 0.722, 13.3, 11.2, 25.8, 1.2), 29.6),
    ("CUB", "HM[S,M]", '16', (14.4, 42.0, 14.8, 34.7, 0.599, 0.693, 17.5, 14.4, 26.5, 2.4), 34.8),
    ("CUB", "HM[S,M]", '32', (15.1, 41.8, 15.2, 33.0, 0.589, 0.686, 18.7, 14.9, 27.8, 2.9), 35.7),
]


PERCENT_KEYS = ("CA+", "CA-", "QA+", "QA-", "ES:R", "LTM", "GTM", "GTT")  # printed in %, stored as fractions


def from_paper(values) -> dict[str, float]:
    """A printed row in rdml's units: percentages become fractions, TMA and ES:D stay as they are."""
    return {k: v / 100 if k in PERCENT_KEYS else v for k, v in zip(ERS_KEYS, values, strict=True)}


@pytest.mark.parametrize("data,defense,eta,values,printed", T_SOTA + T_HMEFF)
def test_ers_reproduces_the_paper_tables(data, defense, eta, values, printed):
    assert ers(from_paper(values)) == pytest.approx(printed, abs=0.1), (data, defense, eta)


def test_percent_keys_are_exactly_the_fraction_metrics_of_the_registry():
    from rdml.metrics import FRACTION, lookup

    assert {k for k in ERS_KEYS if lookup(f"attacks.{k}").unit == FRACTION} == set(PERCENT_KEYS)


def test_tables_cover_every_cub_and_cars_row():
    assert sum(r[0] == "CUB" for r in T_SOTA) == 9 and sum(r[0] == "CARS" for r in T_SOTA) == 9


def test_vanilla_cub_worked_example():
    values = from_paper((0.0, 100.0, 0.0, 99.9, 0.883, 1.762, 0.0, 0.0, 14.1, 0.0))
    terms = ers_terms({f"attacks.{k}": v for k, v in values.items()})  # the evaluate JSON's key style
    assert [round(t, 1) for t in terms.values()] == [0.0, 0.0, 0.0, 0.1, 11.7, 11.9, 0.0, 0.0, 14.1, 0.0]
    assert ers(values) == pytest.approx(3.8, abs=0.05)


def test_no_effect_scores_about_100_and_missing_keys_fail():
    untouched = from_paper((50.0, 0.0, 50.0, 0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 100.0))
    assert ers(untouched) == pytest.approx(100.0)
    with pytest.raises(KeyError, match="GTT"):
        ers({k: v for k, v in untouched.items() if k != "GTT"})


def test_collapse_threshold():
    assert is_collapsed(0.008) and not is_collapsed(0.35)


def test_a_shrunken_embedding_counts_as_collapsed_even_with_high_recall():
    """Min-max training can shrink every embedding into a tiny cap (ranking intact, ERS inflated)."""
    import numpy as np

    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(200, 16))
    healthy /= np.linalg.norm(healthy, axis=1, keepdims=True)
    pole = np.zeros(16)
    pole[0] = 1.0
    shrunk = pole + 1e-3 * healthy
    shrunk /= np.linalg.norm(shrunk, axis=1, keepdims=True)
    brute = np.sqrt(((healthy[:, None] - healthy[None]) ** 2).sum(-1).mean())
    assert embedding_spread(healthy) == pytest.approx(brute, rel=1e-9)
    assert embedding_spread(shrunk) < 0.01
    assert is_collapsed(0.97, embedding_spread(shrunk))
    assert not is_collapsed(0.97, embedding_spread(healthy))
