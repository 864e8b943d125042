"""Exact k-nearest-neighbour search on faiss (IndexFlatL2), batched over queries.

A GPU index is used when faiss sees a GPU (``faiss.get_num_gpus() > 0``, faiss-gpu installs) and
k <= 2048 (the GPU k limit); otherwise the CPU index. faiss' OpenMP thread count is left as is.
"""

from __future__ import annotations

import faiss
import numpy as np

GPU_MAX_K = 2048


def _as_f32(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def flat_index(database: np.ndarray, k: int = 1):
    """A filled exact L2 index (on GPU when available and k allows)."""
    index = faiss.IndexFlatL2(database.shape[1])
    if faiss.get_num_gpus() > 0 and k <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    return index


def knn(query, database, k: int, exclude_self: bool = False, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """``(squared L2 distances [nq, k], indices [nq, k])``, nearest first.

    ``exclude_self``: ``query`` *is* ``database`` (row i is item i); the query's own index is removed
    from its result (not "the nearest item", so exact duplicates are handled). Rows whose own index
    is not among the k+1 results (ties with duplicates) drop their last result instead.
    """
    q = _as_f32(query)
    db = _as_f32(database)
    if exclude_self and q.shape[0] != db.shape[0]:
        raise ValueError("exclude_self needs query == database (same rows)")
    kk = k + 1 if exclude_self else k
    kk = min(kk, db.shape[0])
    index = flat_index(db, kk)
    out_d = np.empty((q.shape[0], kk - int(exclude_self)), np.float32)
    out_i = np.empty((q.shape[0], kk - int(exclude_self)), np.int64)
    for s in range(0, q.shape[0], batch_size):
        d, i = index.search(q[s : s + batch_size], kk)
        if exclude_self:
            own = np.arange(s, s + len(i))[:, None]
            drop = i == own
            missing = ~drop.any(axis=1)
            drop[missing, -1] = True
            keep = ~drop
            d = d[keep].reshape(len(i), kk - 1)
            i = i[keep].reshape(len(i), kk - 1)
        out_d[s : s + len(i)] = d
        out_i[s : s + len(i)] = i
    return out_d, out_i
