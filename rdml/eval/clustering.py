"""Clustering metrics: faiss k-means with a fixed seed, then NMI, ARI, clustering F1 and accuracy.

Everything is computed from the sparse contingency table (class x cluster counts), so memory is
O(n + non-zeros), never O(n²), even at SOP scale (60k items, 11k clusters).

* NMI: 2 I(Y;C) / (H(Y) + H(C)) ("arithmetic", scikit-learn's default).
* ARI: Hubert & Arabie's adjusted Rand index (as scikit-learn).
* F1 (Oh Song et al. 2016, the clustering F1 of DML papers): over pairs of items, precision =
  same-cluster-and-same-class pairs / same-cluster pairs, recall = ... / same-class pairs.
* Accuracy: the best one-to-one matching of clusters to classes (Hungarian), as the fraction of items
  on matched pairs. Small tables use ``scipy.optimize.linear_sum_assignment``; large ones an exact
  sparse min-cost perfect matching on an augmented graph (every cluster and class also gets a zero-
  value dummy partner), which never materialises the dense k x K matrix.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

DENSE_ASSIGNMENT_MAX = 4_000_000  # k*K above this uses the sparse matching


def kmeans(emb, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Cluster ids (int64 [n]) from faiss k-means (fixed seed), each item to its nearest centroid."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = x.shape
    k = int(max(1, min(k, n)))
    if k == 1:
        return np.zeros(n, np.int64)
    # min_points_per_centroid=1: small test sets (64 attacked queries, 10 classes) are legitimate here, and
    # faiss would otherwise print a warning per call; max_points_per_centroid keeps faiss from subsampling
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), gpu=faiss.get_num_gpus() > 0, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1_000_000)
    km.train(x)
    _, idx = km.index.search(x, 1)
    return idx.reshape(-1).astype(np.int64)


def contingency(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Sparse contingency: (row ids, col ids, counts) of non-zero cells, and the table shape."""
    yt = np.unique(np.asarray(labels_true).reshape(-1), return_inverse=True)[1]
    yp = np.unique(np.asarray(labels_pred).reshape(-1), return_inverse=True)[1]
    if len(yt) != len(yp):
        raise ValueError(f"{len(yt)} true labels but {len(yp)} predicted")
    kt = int(yt.max()) + 1 if len(yt) else 0
    kp = int(yp.max()) + 1 if len(yp) else 0
    cells, counts = np.unique(yt.astype(np.int64) * kp + yp, return_counts=True)
    return cells // max(kp, 1), cells % max(kp, 1), counts.astype(np.int64), (kt, kp)


def _comb2(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float((x * (x - 1.0) / 2.0).sum())


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi_score(labels_true, labels_pred) -> float:
    """Normalised mutual information, arithmetic mean normalisation (= sklearn's default)."""
    r, c, nij, (kt, kp) = contingency(labels_true, labels_pred)
    n = int(nij.sum())
    if n == 0 or (kt == kp == 1):
        return 1.0
    a = np.bincount(r, weights=nij, minlength=kt)
    b = np.bincount(c, weights=nij, minlength=kp)
    mi = float((nij / n * (np.log(nij) + math.log(n) - np.log(a[r]) - np.log(b[c]))).sum())
    mi = max(mi, 0.0)
    norm = max((_entropy(a, n) + _entropy(b, n)) / 2.0, np.finfo(np.float64).eps)
    return float(mi / norm)


def _pair_counts(labels_true, labels_pred) -> tuple[float, float, float, float]:
    r, c, nij, (kt, kp) = contingency(labels_true, labels_pred)
    n = int(nij.sum())
    a = np.bincount(r, weights=nij, minlength=kt)
    b = np.bincount(c, weights=nij, minlength=kp)
    return _comb2(nij), _comb2(a), _comb2(b), n * (n - 1) / 2.0


def ari_score(labels_true, labels_pred) -> float:
    """Adjusted Rand index (= sklearn's ``adjusted_rand_score``)."""
    tp, same_class, same_cluster, total = _pair_counts(labels_true, labels_pred)
    fp = same_cluster - tp
    fn = same_class - tp
    tn = total - tp - fp - fn
    if fn == 0 and fp == 0:
        return 1.0
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    return float(2.0 * (tp * tn - fn * fp) / den) if den else 1.0


def cluster_f1(labels_true, labels_pred) -> float:
    """Pairwise clustering F1 (Oh Song et al.): harmonic mean of pair precision and pair recall."""
    tp, same_class, same_cluster, _ = _pair_counts(labels_true, labels_pred)
    if tp == 0:
        return 0.0
    precision, recall = tp / same_cluster, tp / same_class
    return float(2 * precision * recall / (precision + recall))


def cluster_accuracy(labels_true, labels_pred) -> float:
    """Best one-to-one cluster->class matching accuracy (Hungarian)."""
    r, c, nij, (kt, kp) = contingency(labels_true, labels_pred)
    n = int(nij.sum())
    if n == 0:
        return 1.0
    if kt * kp <= DENSE_ASSIGNMENT_MAX:
        table = np.zeros((kt, kp), np.int64)
        table[r, c] = nij
        ri, ci = linear_sum_assignment(table, maximize=True)
        return float(table[ri, ci].sum() / n)
    return float(_sparse_max_matching(r, c, nij, kt, kp) / n)


def _sparse_max_matching(r: np.ndarray, c: np.ndarray, w: np.ndarray, kt: int, kp: int) -> int:
    """Max-weight bipartite matching value of a sparse table via a min-cost *perfect* matching.

    Rows: classes 0..kt-1 then one dummy per cluster; columns: clusters 0..kp-1 then one dummy per
    class. Edges: real (i, j) with cost B - w_ij; class i -> its dummy column; cluster j's dummy row
    -> j; and for every real edge, dummy-row(j) -> dummy-column(i). Any partial matching of real edges
    extends to a perfect one, every perfect matching has kt + kp edges, so the min cost is
    (kt + kp) * B - (max matched weight). All costs are positive (B = max w + 1).
    """
    big = int(w.max()) + 1
    m = len(w)
    rows = np.concatenate([r, np.arange(kt), kt + np.arange(kp), kt + c])
    cols = np.concatenate([c, kp + np.arange(kt), np.arange(kp), kp + r])
    cost = np.concatenate([big - w, np.full(kt + kp + m, big)]).astype(np.float64)
    graph = coo_matrix((cost, (rows, cols)), shape=(kt + kp, kp + kt)).tocsr()
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    total = float(np.asarray(graph[row_ind, col_ind]).sum())
    return int(round((kt + kp) * big - total))


def clustering_metrics(emb, labels, k: int | None = None, seed: int = 0, niter: int = 20) -> dict[str, float]:
    """``{"nmi","ari","cluster_acc","cluster_f1"}`` of faiss k-means (k = number of classes by default)."""
    y = np.asarray(labels).reshape(-1)
    k = int(len(np.unique(y))) if k is None else int(k)
    pred = kmeans(emb, k, seed=seed, niter=niter)
    return cluster_label_metrics(y, pred)


def cluster_label_metrics(labels_true, labels_pred) -> dict[str, float]:
    """The four clustering metrics of a given cluster assignment."""
    return {
        "nmi": nmi_score(labels_true, labels_pred),
        "ari": ari_score(labels_true, labels_pred),
        "cluster_acc": cluster_accuracy(labels_true, labels_pred),
        "cluster_f1": cluster_f1(labels_true, labels_pred),
    }
