"""Retrieval metrics: R@k, mAP (over all same-class items) and mAP@R, from exact ranks of positives.

Protocol (robrank / Musgrave et al.): every test item queries the whole test set under Euclidean
distance; the query's *own index* is excluded (not "the nearest item", so exact duplicates are
handled). With a separate gallery (In-Shop) queries search the gallery and nothing is excluded.
Which of the two a data set uses is decided in one place, :func:`rdml.eval.protocol.evaluation_sets`.
Queries without any same-class item in the database are left out of the averages (as
pytorch-metric-learning does); if no query has one, every metric is NaN.

How: rather than a kNN list, we compute for every query the exact 1-based rank of each of its
positives in the full ranking, r_1 < r_2 < ... < r_R. Then

* R@k   = [r_1 <= k]
* AP    = (1/R) Σ_j j / r_j                      (average precision of the full ranking)
* AP@R  = (1/R) Σ_{j: r_j <= R} j / r_j          (Musgrave's mAP@R, R = number of positives)

The ranks come from one blocked pass over the distance matrix (:func:`rdml.eval.ranks.positive_ranks`:
memory bounded by the tile size, half the products of a kNN search in the self-query case, by
symmetry), so all of these metrics cost one pass; ties between a positive and a negative count in
favour of the positive. Runs on CUDA when torch sees a GPU.
"""

from __future__ import annotations

import math

import numpy as np

from rdml.eval.ranks import positive_ranks

__all__ = ["KS", "knn_metrics", "metrics_from_ranks", "per_query_from_ranks", "positive_ranks", "retrieval_metrics"]

KS = (1, 2, 4, 8)


def per_query_from_ranks(ranks: np.ndarray, num_pos: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query ``recall@1`` (0/1) and ``map`` (the query's AP); NaN for queries without a positive.

    Their means are :func:`metrics_from_ranks`' R@1 and mAP (which leave such queries out), so they
    are what a bootstrap over queries resamples (:mod:`rdml.eval.intervals`).
    """
    use = num_pos > 0
    r1 = np.full(len(num_pos), np.nan)
    ap = np.full(len(num_pos), np.nan)
    if use.any():
        r = ranks[use]
        j = np.arange(1, r.shape[1] + 1, dtype=np.float64)[None, :]
        prec = np.where(np.isfinite(r), j / r, 0.0)
        r1[use] = (r[:, 0] <= 1).astype(np.float64)
        ap[use] = prec.sum(1) / num_pos[use]
    return {"recall@1": r1, "map": ap}


def metrics_from_ranks(ranks: np.ndarray, num_pos: np.ndarray, ks=KS) -> dict[str, float]:
    """R@k, mAP and mAP@R from the sorted ranks of the positives (see module docstring)."""
    use = num_pos > 0
    out: dict[str, float] = {}
    if not use.any():
        return {**{f"recall@{k}": math.nan for k in ks}, "map": math.nan, "map@r": math.nan}
    r = ranks[use]
    npos = num_pos[use].astype(np.float64)
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(r[:, 0] <= k))
    j = np.arange(1, r.shape[1] + 1, dtype=np.float64)[None, :]
    prec = np.where(np.isfinite(r), j / r, 0.0)
    out["map"] = float(np.mean(prec.sum(1) / npos))
    at_r = np.where(r <= npos[:, None], prec, 0.0)
    out["map@r"] = float(np.mean(at_r.sum(1) / npos))
    return out


def knn_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray | None = None,
    database_labels: np.ndarray | None = None,
    ks=KS,
) -> dict[str, float]:
    """R@k and mAP@R from one faiss kNN list of length max(max k, largest R); ``map`` is NaN.

    It cannot give the mAP of the full ranking. It can be cheaper than :func:`positive_ranks` where
    classes are large and their positives sit deep in the ranking (it never counts the negatives in
    front of far positives); in the self-query case the rank pass computes half the distances a kNN
    search does, and at SOP scale it is the faster of the two (``bench/eval_speed.py``).
    """
    from rdml.eval.knn import knn

    self_query = database is None
    if self_query:
        database, database_labels = query, query_labels
    ql = np.asarray(query_labels).reshape(-1)
    dl = np.asarray(database_labels).reshape(-1)
    classes, inv = np.unique(np.concatenate([ql, dl]), return_inverse=True)
    qc, dc = inv[: len(ql)], inv[len(ql) :]
    num_pos = np.bincount(dc, minlength=len(classes))[qc] - int(self_query)
    use = num_pos > 0
    nan = {**{f"recall@{k}": math.nan for k in ks}, "map": math.nan, "map@r": math.nan}
    if not use.any():
        return nan
    k = int(min(len(dl) - int(self_query), max(max(ks), int(num_pos.max()))))
    _, idx = knn(query, database, k, exclude_self=self_query)
    rel = dc[idx[use]] == qc[use][:, None]
    npos = num_pos[use].astype(np.float64)
    out = {f"recall@{kk}": float(rel[:, :kk].any(1).mean()) for kk in ks}
    prec = np.cumsum(rel, 1) / np.arange(1, k + 1)[None, :]
    within = np.arange(k)[None, :] < npos[:, None]
    out["map"] = math.nan
    out["map@r"] = float(np.mean((prec * rel * within).sum(1) / npos))
    return out


def retrieval_metrics(
    emb,
    labels,
    gallery_emb=None,
    gallery_labels=None,
    ks=KS,
    device=None,
    block: int | None = None,
    full_map: bool = True,
) -> dict[str, float]:
    """``{"recall@1","recall@2","recall@4","recall@8","map","map@r"}`` as fractions in [0,1].

    Without a gallery: every item queries the whole set, its own index excluded. With
    ``gallery_emb``/``gallery_labels`` (In-Shop): ``emb`` are queries searched against the gallery.
    All of them come from one pass (:func:`positive_ranks`). ``full_map=False`` skips the mAP of the
    full ranking (``map`` is NaN) and scores a faiss kNN list instead (:func:`knn_metrics`).
    """
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("pass both gallery_emb and gallery_labels, or neither")
    if not full_map:
        return knn_metrics(np.asarray(emb), np.asarray(labels), None if gallery_emb is None else np.asarray(gallery_emb),
                           None if gallery_labels is None else np.asarray(gallery_labels), ks)
    ranks, num_pos = positive_ranks(
        np.asarray(emb), np.asarray(labels), None if gallery_emb is None else np.asarray(gallery_emb),
        None if gallery_labels is None else np.asarray(gallery_labels), device=device, block=block,
    )
    return metrics_from_ranks(ranks, num_pos, ks)
