"""rdml's metrics and pytorch-metric-learning's AccuracyCalculator agree where docs/api.md says they do, and
differ (ties) where it says they do not; rdml's knn_func is a drop-in for PML's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PMLCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

from rdml.eval.pml import AccuracyCalculator, knn_func
from rdml.eval.retrieval import retrieval_metrics

PML_METRICS = ("precision_at_1", "mean_average_precision_at_r", "mean_average_precision")
TOL = 1e-5  # float32 distances computed in a different order: near-equal distances may swap


def embeddings(n: int = 240, classes: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    labels = g.integers(0, classes, n)
    centres = g.normal(size=(classes, 16))
    emb = centres[labels] + 1.2 * g.normal(size=(n, 16))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels


def _pml(calc, q, ql, r=None, rl=None, include=PML_METRICS):
    args = [torch.from_numpy(q), torch.from_numpy(ql)]
    if r is not None:
        args += [torch.from_numpy(r), torch.from_numpy(rl), False]
    return calc.get_accuracy(*args, include=include)


@pytest.mark.parametrize("gallery", [False, True])
def test_pml_and_rdml_agree_without_ties(gallery):
    emb, labels = embeddings()
    if gallery:  # In-Shop style: 60 queries against a separate gallery of 180
        q, ql, r, rl = emb[:60], labels[:60], emb[60:], labels[60:]
        ours = retrieval_metrics(q, ql, r, rl)
    else:  # the reference is the query set: each query's own item excluded by both
        q, ql, r, rl = emb, labels, None, None
        ours = retrieval_metrics(q, ql)
    for knn in (knn_func, FaissKNN()):
        pml = _pml(PMLCalculator(k=None, knn_func=knn), q, ql, r, rl)
        assert pml["precision_at_1"] == pytest.approx(ours["recall@1"], abs=1e-12)
        assert pml["mean_average_precision_at_r"] == pytest.approx(ours["map@r"], abs=TOL)
        assert pml["mean_average_precision"] == pytest.approx(ours["map"], abs=TOL)  # k=None: the full ranking
    assert 0.1 < ours["recall@1"] < 0.95  # neither trivial nor hopeless: the comparison means something


def test_rdml_metrics_inside_pml_code():
    emb, labels = embeddings()
    calc = AccuracyCalculator(k="max_bin_count")
    acc = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels))
    ours = retrieval_metrics(emb, labels)
    for k in (1, 2, 4, 8):
        assert acc[f"rdml_recall_at_{k}"] == ours[f"recall@{k}"]
    assert (acc["rdml_map"], acc["rdml_map_at_r"]) == (ours["map"], ours["map@r"])
    assert acc["precision_at_1"] == pytest.approx(acc["rdml_recall_at_1"], abs=1e-12)
    q, r = torch.from_numpy(emb[:50]), torch.from_numpy(emb)
    with pytest.raises(ValueError, match="reference \\*is\\* the query set"):
        calc.get_accuracy(q, torch.from_numpy(labels[:50]), r, torch.from_numpy(labels), True)


def test_knn_func_excludes_self_by_index_even_with_duplicates():
    emb, labels = embeddings(40)
    emb[1] = emb[0]  # an exact duplicate: "the nearest item" is ambiguous, the own index is not
    d, i = knn_func(torch.from_numpy(emb), 5, torch.from_numpy(emb), True)
    assert i.shape == (40, 5) and not (i.numpy() == np.arange(40)[:, None]).any()
    assert i[0, 0] == 1 and i[1, 0] == 0 and float(d[0, 0]) == 0.0


def test_ties_count_for_the_positive_in_rdml_not_in_pml():
    # the query's positive and a negative lie at exactly the same distance (2 = 1 + 1 in float32); the negative
    # has the lower index, so the kNN list puts it first
    q, ql = np.array([[1.0, 0.0]], np.float32), np.array([0])
    ref, rl = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32), np.array([1, 0])
    ours = retrieval_metrics(q, ql, ref, rl)
    pml = _pml(PMLCalculator(k=None, knn_func=knn_func), q, ql, ref, rl, include=("precision_at_1",))
    assert ours["recall@1"] == 1.0 and pml["precision_at_1"] == 0.0
