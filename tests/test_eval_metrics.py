"""Evaluation metrics against independent references: a brute-force numpy oracle,
pytorch-metric-learning's AccuracyCalculator and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch.utils.data import Dataset

from rdml.eval import (
    ari_score,
    benign_metrics,
    cluster_accuracy,
    cluster_f1,
    clustering_metrics,
    embed,
    evaluate_model,
    kmeans,
    knn,
    nmi_score,
    retrieval_metrics,
)
from rdml.eval.clustering import _sparse_max_matching, contingency


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_set(n=400, classes=20, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(n, dim))), rng.integers(0, classes, n)


def clustered_set(n=600, classes=30, dim=16, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), np.arange(classes), rng.integers(0, classes, n - 2 * classes)])
    centres = unit(rng.normal(size=(classes, dim)))
    return unit(centres[labels] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)), labels


def brute_force(x, y, gx=None, gy=None):
    """Sort every query's full distance list and score it the textbook way."""
    self_query = gx is None
    if self_query:
        gx, gy = x, y
    d = ((x[:, None, :].astype(np.float64) - gx[None, :, :]) ** 2).sum(-1)
    if self_query:
        np.fill_diagonal(d, np.inf)
    out = {k: [] for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r")}
    for i in range(len(x)):
        order = np.argsort(d[i], kind="stable")[: len(gx) - int(self_query)]
        rel = (gy[order] == y[i]).astype(float)
        r = rel.sum()
        if r == 0:
            continue
        for k in (1, 2, 4, 8):
            out[f"recall@{k}"].append(rel[:k].max())
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        out["map"].append((prec * rel).sum() / r)
        out["map@r"].append((prec * rel)[: int(r)].sum() / r)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("maker", [random_set, clustered_set])
@pytest.mark.parametrize("block", [64, 4096])
def test_retrieval_matches_brute_force(maker, block):
    x, y = maker()
    ours = retrieval_metrics(x, y, block=block)
    ref = brute_force(x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


@pytest.mark.parametrize("gallery", [False, True])
def test_knn_path_matches_brute_force(gallery):
    x, y = clustered_set(n=300, seed=2)
    g, gy = (clustered_set(n=200, seed=2) if gallery else (None, None))
    ours = retrieval_metrics(x, y, g, gy, full_map=False)
    ref = brute_force(x, y, g, gy)
    assert np.isnan(ours["map"])
    for k in ref:
        if k != "map":
            assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


def test_query_vs_gallery_matches_brute_force():
    x, y = clustered_set(n=200, seed=1)
    g, gy = clustered_set(n=300, seed=1)
    ours = retrieval_metrics(x, y, gallery_emb=g, gallery_labels=gy, block=128)
    ref = brute_force(x, y, g, gy)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


def test_duplicates_exclude_own_index_only():
    """An exact duplicate of the query with the same label is a true hit, not 'self'."""
    x = unit(np.array([[1, 0], [1, 0], [0, 1], [0.1, 1], [-1, 0]], np.float64))
    y = np.array([0, 0, 1, 1, 2])
    m = retrieval_metrics(x, y)
    assert m["recall@1"] == 1.0 and m["map"] == 1.0 and m["map@r"] == 1.0  # the lone class 2 is left out
    _, idx = knn(x, x, k=1, exclude_self=True)
    assert idx[0, 0] == 1 and idx[1, 0] == 0


@pytest.mark.parametrize("maker", [random_set, clustered_set])
def test_retrieval_and_nmi_match_pytorch_metric_learning(maker):
    x, y = maker(n=500)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "mean_average_precision", "NMI"),
        k=None, device=torch.device("cpu"),
    )
    ref = calc.get_accuracy(x, y)
    ours = retrieval_metrics(x, y)
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-4)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-4)
    assert ours["map"] == pytest.approx(ref["mean_average_precision"], abs=1e-4)  # k=None: the full ranking
    # same cluster assignment -> same NMI as PML's (which is sklearn's) formula
    pred = kmeans(x, len(np.unique(y)), seed=0)
    assert nmi_score(y, pred) == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-4)


def test_knn_against_numpy():
    x, _ = random_set(n=300)
    q = x[:50]
    d, i = knn(q, x, k=5)
    full = ((q[:, None] - x[None]) ** 2).sum(-1)
    assert np.array_equal(i[:, 0], np.arange(50))
    np.testing.assert_allclose(d, np.sort(full, 1)[:, :5], atol=1e-5)
    d2, i2 = knn(x, x, k=4, exclude_self=True, batch_size=37)
    assert not (i2 == np.arange(300)[:, None]).any()
    all_d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(all_d, np.inf)
    np.testing.assert_array_equal(i2, np.argsort(all_d, 1)[:, :4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 12, 400)
    c = np.where(rng.random(400) < 0.6, y, rng.integers(0, 15, 400))  # structured, partly noisy
    for pred in (c, rng.integers(0, 9, 400)):
        assert nmi_score(y, pred) == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-10)
        assert ari_score(y, pred) == pytest.approx(adjusted_rand_score(y, pred), abs=1e-10)


def test_clustering_identities():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    perm = rng.permutation(10)
    assert nmi_score(y, y) == pytest.approx(1.0, abs=1e-12)
    assert ari_score(y, y) == 1.0 and cluster_f1(y, y) == 1.0
    assert cluster_accuracy(y, perm[y] + 100) == 1.0  # permuted (and renamed) labelling
    assert nmi_score(y, rng.integers(0, 10, 300)) < 0.1
    assert nmi_score(np.zeros(5), np.zeros(5)) == 1.0


def test_cluster_f1_and_accuracy_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    c = np.array([0, 0, 1, 1, 1, 1])
    # same-cluster pairs: C(2,2)+C(4,2)=7; same-class pairs: 3+1=4; both: (0,1),(3,4) = 2
    p, r = 2 / 7, 2 / 4
    assert cluster_f1(y, c) == pytest.approx(2 * p * r / (p + r))
    assert cluster_accuracy(y, c) == pytest.approx(4 / 6)  # cluster0->class0 (2), cluster1->class1 (2)


def test_sparse_hungarian_equals_dense():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, c = rng.integers(0, 40, 600), rng.integers(0, 33, 600)
        r, col, w, (kt, kp) = contingency(y, c)
        assert _sparse_max_matching(r, col, w, kt, kp) == round(cluster_accuracy(y, c) * 600)


def test_clustering_metrics_on_clustered_embeddings():
    x, y = clustered_set(noise=0.3)
    m = clustering_metrics(x, y, seed=0)
    assert set(m) == {"nmi", "ari", "cluster_acc", "cluster_f1"}
    assert m["nmi"] > 0.9 and m["cluster_acc"] > 0.8
    assert clustering_metrics(x, y, seed=0) == m  # fixed seed -> deterministic
    assert clustering_metrics(*random_set(), seed=0)["nmi"] < m["nmi"]


class _Toy(Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def test_embed_and_evaluate_model_restore_mode():
    x, y = clustered_set(n=120, classes=6)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5))
    model.train()
    emb, labels = embed(model, _Toy(x, y), batch_size=50)
    assert emb.shape == (120, 16) and emb.dtype == np.float32 and labels.dtype == np.int64
    assert np.array_equal(labels, y) and model.training
    np.testing.assert_allclose(emb, model.eval()(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    m = evaluate_model(torch.nn.Identity(), _Toy(x, y), batch_size=32)
    assert m == pytest.approx(benign_metrics(x, y))
    assert {"recall@1", "map", "map@r", "nmi", "ari", "cluster_acc", "cluster_f1"} <= set(m)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    g = evaluate_model(torch.nn.Identity(), _Toy(x[:40], y[:40]), gallery=_Toy(x[40:], y[40:]))
    assert g["recall@1"] == pytest.approx(retrieval_metrics(x[:40], y[:40], x[40:], y[40:])["recall@1"])
