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


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the (clamped non-negative) float32 values."""
    return x.float().clamp_min(0.0).view(torch.int32).to(torch.int64)


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
    # order-preserving integer keys: row r's positives occupy [r << 32, (r+1) << 32); the bit pattern of
    # a non-negative float32 is monotone in its value (+inf pads sort after every finite distance)
    keys = (torch.arange(nq, device=dev, dtype=torch.int64)[:, None] << 32) + _float_bits(pd)
    keys = keys.reshape(-1)
    hist = torch.zeros(nq * (max_count + 1), dtype=torch.int64, device=dev)

    def count(local_rows: torch.Tensor, vals: torch.Tensor, r0: int, r1: int) -> None:
        """Add negatives (rows ``r0 + local_rows``, squared distances ``vals``) to the histogram."""
        if local_rows.numel() == 0:
            return
        local_keys = keys[r0 * max_count : r1 * max_count] - (r0 << 32)
        key = _float_bits(vals).add_(local_rows << 32)
        pos_le = torch.searchsorted(local_keys, key, right=True)
        # bucket = #positives of the row <= v = pos_le - row*M; histogram index row*(M+1) + bucket
        window = (r1 - r0) * (max_count + 1)
        hist[r0 * (max_count + 1) : r0 * (max_count + 1) + window] += torch.bincount(
            pos_le.add_(local_rows), minlength=window
        )

    # 2. one pass over the distance matrix in tiles: count negatives closer than each positive
    members = pos  # every same-class database item of each query (self included)
    for i0 in range(0, nq, block):
        i1 = min(nq, i0 + block)
        thr_rows = hi_row[i0:i1, None]
        mem = members[i0:i1]
        for j0 in range(i0 if self_query else 0, n, block):
            j1 = min(n, j0 + block)
            w = j1 - j0
            tile = qa[i0:i1] @ da[j0:j1].T  # squared L2 distances
            # same-class pairs (positives, self) never count as closer negatives; the relation is
            # symmetric, so this also serves the transposed tile
            inside = (mem >= j0) & (mem < j1)
            pr, pc = torch.nonzero(inside, as_tuple=True)
            tile[pr, mem[pr, pc] - j0] = inf
            flat_tile = tile.view(-1)
            flat = torch.nonzero((tile < thr_rows).view(-1)).view(-1)
            count(torch.div(flat, w, rounding_mode="floor"), flat_tile[flat], i0, i1)
            if self_query and j0 != i0:  # the transposed tile serves rows j0..j1
                flat = torch.nonzero((tile < hi_row[None, j0:j1]).view(-1)).view(-1)
                count(torch.remainder(flat, w), flat_tile[flat], j0, j1)

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


def knn_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray | None = None,
    database_labels: np.ndarray | None = None,
    ks=KS,
) -> dict[str, float]:
    """R@k and mAP@R from one faiss kNN list of length max(max k, largest R); ``map`` is NaN.

    Cheaper than :func:`positive_ranks` when positives sit deep in the ranking (it never counts
    the negatives in front of far positives), but it cannot give the mAP of the full ranking.
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
    ``full_map=False`` skips the mAP of the full ranking (``map`` is NaN) and scores a faiss kNN list
    instead (:func:`knn_metrics`), which is faster when positives sit deep in the ranking.
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
