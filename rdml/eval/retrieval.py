"""Retrieval metrics: R@k, mAP (over all same-class items) and mAP@R, from exact ranks of positives.

Protocol (robrank / Musgrave et al.): every test item queries the whole test set under Euclidean
distance; the query's *own index* is excluded (not "the nearest item", so exact duplicates are
handled). With a separate gallery (In-Shop) queries search the gallery and nothing is excluded.
Queries without any same-class item in the database are left out of the averages (as
pytorch-metric-learning does); if no query has one, every metric is NaN.

How: rather than a kNN list, we compute for every query the exact 1-based rank of each of its
positives in the full ranking, r_1 < r_2 < ... < r_R. Then

* R@k   = [r_1 <= k]
* AP    = (1/R) Σ_j j / r_j                      (average precision of the full ranking)
* AP@R  = (1/R) Σ_{j: r_j <= R} j / r_j          (Musgrave's mAP@R, R = number of positives)

The ranks come from one pass over the distance matrix in tiles (memory bounded by the tile size,
never an N x N matrix; half the products in the self-query case, by symmetry): we compute the
positives' distances directly, and count how many negatives are closer than each positive by
bucketing only the negatives closer than the farthest positive (``searchsorted`` into the sorted
positive distances). Ties between a positive and a
negative count in favour of the positive. Runs on CUDA when torch sees a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (1, 2, 4, 8)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _class_table(db_labels: np.ndarray, num_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """[num_classes, max_count] database indices per class, padded with -1; and the class counts."""
    order = np.argsort(db_labels, kind="stable")
    counts = np.bincount(db_labels, minlength=num_classes)
    max_count = max(int(counts.max()) if counts.size else 0, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.full((num_classes, max_count), -1, np.int64)
    pos_in_class = np.arange(len(order)) - np.repeat(starts, counts)
    table[db_labels[order], pos_in_class] = order
    return torch.from_numpy(table), counts


def _augment(x: torch.Tensor, sq: torch.Tensor, side: str) -> torch.Tensor:
    """[x, |x|², 1] (queries) or [-2x, 1, |x|²] (database): one GEMM then gives squared L2 distances."""
    one = torch.ones_like(sq)[:, None]
    if side == "query":
        return torch.cat([x, sq[:, None], one], 1).contiguous()
    return torch.cat([-2.0 * x, one, sq[:, None]], 1).contiguous()


def positive_ranks(
    query: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray | None = None,
    database_labels: np.ndarray | None = None,
    device=None,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks of every query's positives.

    Returns ``(ranks float64 [nq, M], num_pos int64 [nq])``: row i holds the sorted 1-based ranks of its
    ``num_pos[i]`` positives in columns ``< num_pos[i]`` (the rest is inf). With ``database=None`` the
    query set is its own database and each query's own index is excluded.

    The distance matrix is visited in ``block`` x ``block`` tiles (memory ~ 5 * block² bytes). In the
    self-query case it is symmetric, so only tiles on and above the diagonal are computed and each
    off-diagonal tile serves its rows *and*, transposed, its columns: half the matrix products.
    """
    self_query = database is None
    if self_query:
        database, database_labels = query, query_labels
    dev = torch.device(device) if device is not None else _default_device()
    if block is None:
        block = 8192 if dev.type == "cuda" else 2048
    ql = np.asarray(query_labels).reshape(-1)
    dl = np.asarray(database_labels).reshape(-1)
    classes, inv = np.unique(np.concatenate([ql, dl]), return_inverse=True)
    qc_np, dc_np = inv[: len(ql)], inv[len(ql) :]
    table, counts = _class_table(dc_np, len(classes))
    max_count = table.shape[1]
    nq, n = len(ql), len(dl)
    num_pos = counts[qc_np].astype(np.int64) - int(self_query)
    inf = float("inf")
    if nq == 0 or n == 0:
        return np.full((nq, max_count), np.inf), np.zeros(nq, np.int64)

    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).to(dev)
    db = q if self_query else torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(dev)
    q_sq, db_sq = (q * q).sum(1), (db * db).sum(1)
    qa = _augment(q, q_sq, "query")
    da = _augment(db, db_sq, "db")
    qc = torch.from_numpy(qc_np).to(dev)
    dc = torch.from_numpy(dc_np).to(dev)
    table = table.to(dev)

    # 1. squared distances to each query's positives, sorted; pads (and self) = +inf
    pos = table[qc]
    valid = pos >= 0
    if self_query:
        valid &= pos != torch.arange(nq, device=dev)[:, None]
    pd = torch.empty(pos.shape, dtype=torch.float32, device=dev)
    step = max(1, (64 << 20) // (4 * max_count * da.shape[1]))
    for s in range(0, nq, step):
        e = min(nq, s + step)
        pd[s:e] = torch.bmm(da[pos[s:e].clamp_min(0)], qa[s:e, :, None])[..., 0]
    pd = torch.where(valid, pd, torch.full_like(pd, inf))
    pd, _ = torch.sort(pd, dim=1)
    hi_row = torch.where(valid.any(1), pd.masked_fill(~torch.isfinite(pd), -inf).amax(1), torch.full_like(pd[:, 0], -inf))
    if not bool(torch.isfinite(hi_row).any()):
        return np.full((nq, max_count), np.inf), num_pos
    hi = float(hi_row[torch.isfinite(hi_row)].max().item())
    lo = -1.0 - 1e-3 * float(max(q_sq.max().item(), db_sq.max().item()))
    span = hi - lo + 2.0
    # global sorted keys: row r's positives live in [r*span, (r+1)*span); pads just above the row's values
    keys = torch.where(torch.isfinite(pd), pd.double() - lo, torch.full_like(pd, hi - lo + 1.0, dtype=torch.float64))
    keys = (keys + torch.arange(nq, device=dev, dtype=torch.float64)[:, None] * span).reshape(-1)
    hist = torch.zeros(nq * (max_count + 1), dtype=torch.int64, device=dev)

    def count(rows: torch.Tensor, vals: torch.Tensor, r0: int, r1: int) -> None:
        """Add negatives (global row ids ``rows`` in [r0, r1), squared distances ``vals``) to the histogram."""
        if rows.numel() == 0:
            return
        key = (vals.double() - lo) + rows.double() * span
        local = keys[r0 * max_count : r1 * max_count]
        bucket = torch.searchsorted(local, key, right=True) + r0 * max_count - rows * max_count
        hist.index_add_(0, rows * (max_count + 1) + bucket, torch.ones_like(rows))

    # 2. one pass over the distance matrix in tiles: count negatives closer than each positive
    for i0 in range(0, nq, block):
        i1 = min(nq, i0 + block)
        thr_rows = hi_row[i0:i1, None]
        for j0 in range(i0 if self_query else 0, n, block):
            j1 = min(n, j0 + block)
            tile = qa[i0:i1] @ da[j0:j1].T  # squared L2 distances
            ri, cj = torch.nonzero(tile < thr_rows, as_tuple=True)
            neg = qc[i0 + ri] != dc[j0 + cj]  # drops positives and self
            count(i0 + ri[neg], tile[ri[neg], cj[neg]], i0, i1)
            if self_query and j0 != i0:  # the transposed tile serves rows j0..j1
                ri, cj = torch.nonzero(tile < hi_row[None, j0:j1], as_tuple=True)
                neg = qc[i0 + ri] != dc[j0 + cj]
                count(j0 + cj[neg], tile[ri[neg], cj[neg]], j0, j1)

    neg_closer = hist.view(nq, max_count + 1).cumsum(1)[:, :max_count]
    ranks = neg_closer.double() + torch.arange(1, max_count + 1, device=dev, dtype=torch.float64)
    keep = torch.arange(max_count, device=dev)[None, :] < valid.sum(1, keepdim=True)
    ranks = torch.where(keep, ranks, torch.full_like(ranks, inf))
    return ranks.cpu().numpy(), num_pos


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


def retrieval_metrics(
    emb,
    labels,
    gallery_emb=None,
    gallery_labels=None,
    ks=KS,
    device=None,
    block: int | None = None,
) -> dict[str, float]:
    """``{"recall@1","recall@2","recall@4","recall@8","map","map@r"}`` as fractions in [0,1].

    Without a gallery: every item queries the whole set, its own index excluded. With
    ``gallery_emb``/``gallery_labels`` (In-Shop): ``emb`` are queries searched against the gallery.
    """
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("pass both gallery_emb and gallery_labels, or neither")
    ranks, num_pos = positive_ranks(
        np.asarray(emb), np.asarray(labels), None if gallery_emb is None else np.asarray(gallery_emb),
        None if gallery_labels is None else np.asarray(gallery_labels), device=device, block=block,
    )
    return metrics_from_ranks(ranks, num_pos, ks)
