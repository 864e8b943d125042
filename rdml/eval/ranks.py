"""The exact rank of every positive of every query, from one blocked pass over the distance matrix.

This is the one computation behind rdml's retrieval metrics (:mod:`rdml.eval.retrieval` turns the ranks
into R@k, the mAP over all positives and mAP@R). Its cost is about one matrix product per tile of the
distance matrix, which is what a kNN search (pytorch-metric-learning's, faiss') pays too; the rest is
counting, kept small:

1. the squared distances of each query to its positives (one small product per query), sorted;
2. the distance matrix in ``block`` x ``block`` tiles (never N x N in memory). Without a gallery the
   matrix is symmetric: only tiles on and above the diagonal are computed and each serves its rows
   *and*, transposed, its columns (half the products of a kNN search). In each tile the same-class
   entries are set to +inf; then, per row, the negatives closer than the farthest positive are counted
   with one comparison and one row sum (in a typical ranking most negatives in front of any positive
   lie between the last two positives), and the few closer than the second-farthest are extracted
   and put into buckets by how many positives lie at or below them;
3. rank of positive j = j + the number of negatives closer than it (a tie between a positive and a
   negative counts for the positive).

On the CPU the tiles are shared out to ``torch.get_num_threads()`` threads, each on one intra-op thread
(whole tiles need no synchronisation between threads; see :func:`_count_tiles`) and counted with numpy;
on CUDA one stream of tiles is counted with torch. The ranks do not depend on the number of threads,
on ``levels`` or on which library counts: every tile is the same matrix product and the counts are
integers.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

DENSE_LEVELS = 1
"""How many of each query's farthest positives are counted densely (one comparison and row sum per
tile each); the negatives in front of the others are extracted and bucketed. Speed only."""

NUMPY_ON_CPU = True
"""Count CPU tiles with numpy (about twice as fast as torch's comparisons and sums on one thread);
False counts them with torch, as on CUDA (the tests check that both agree)."""


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


def _positive_distances(qa: torch.Tensor, da: torch.Tensor, members: torch.Tensor, valid: torch.Tensor,
                        chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """Sorted squared distances ``[nq, M]`` of every query to its positives; pads (and self) are +inf.

    One small matrix product per query (``bmm`` over its gathered positives), in chunks that stay in cache."""
    nq, max_count = members.shape
    pd = torch.empty(members.shape, dtype=torch.float32, device=qa.device)
    step = max(1, chunk_bytes // (4 * max_count * da.shape[1]))
    for s in range(0, nq, step):
        e = min(nq, s + step)
        rows = da.index_select(0, members[s:e].clamp_min(0).reshape(-1)).view(e - s, max_count, -1)
        pd[s:e] = torch.bmm(rows, qa[s:e, :, None])[..., 0]
    pd = torch.where(valid, pd, torch.full_like(pd, math.inf))
    return torch.sort(pd, dim=1)[0]


def _thresholds(pd: torch.Tensor, n_valid: torch.Tensor, levels: int) -> torch.Tensor:
    """``[nq, levels + 1]``: column l is the distance of the row's (R - l)-th positive (R = its number of
    positives); -inf where the row has fewer than l + 1 positives or the distance is not positive.

    Distances are compared as if clamped at 0 (the integer keys of :func:`_float_bits`), so a
    rounding-negative distance ties with 0: nothing is closer than a positive at distance <= 0, and
    ``v < t`` for ``t > 0`` is the same test on clamped and unclamped values."""
    idx = n_valid[:, None] - 1 - torch.arange(levels + 1, device=pd.device)[None, :]
    thr = pd.gather(1, idx.clamp_min(0))
    return torch.where((idx >= 0) & (thr > 0), thr, torch.full_like(thr, -math.inf))


class _NegativeCounter:
    """Counts, per query and positive, the negatives closer than that positive, one distance tile at a time.

    The ``levels`` farthest positives of each row get dense per-row counts (one comparison and one row
    sum per level over the tile); the negatives closer than the next positive, usually a small fraction
    of the tile, are extracted and bucketed by how many positives lie at or below them (numpy: by
    comparing with the row's positives; torch: by ``searchsorted`` on order-preserving integer keys,
    row r's positives occupying ``[r << 32, (r+1) << 32)``). Both compare float32 values clamped at 0.
    """

    def __init__(self, pd: torch.Tensor, n_valid: torch.Tensor, levels: int, use_numpy: bool) -> None:
        nq, self.m = pd.shape
        self.levels = min(levels, self.m)
        self.thr = _thresholds(pd, n_valid, self.levels)
        self.n_valid = n_valid
        self.use_numpy = use_numpy and pd.device.type == "cpu"
        if self.use_numpy:  # numpy views of the thresholds and of the positives, clamped like the keys
            self._thr_np, self._pd_np = self.thr.numpy(), pd.clamp_min(0.0).numpy()
        else:
            rows = torch.arange(nq, device=pd.device, dtype=torch.int64)[:, None]
            self.keys = ((rows << 32) + _float_bits(pd)).reshape(-1)
        self._zero()

    def _zero(self) -> None:
        nq, dev = self.n_valid.shape[0], self.n_valid.device
        self.dense = torch.zeros(nq, self.levels, dtype=torch.int64, device=dev)
        self.hist = torch.zeros(nq * (self.m + 1), dtype=torch.int64, device=dev)
        self._mask: Any = None  # scratch comparison buffer, one per counter (thread)

    def fork(self) -> _NegativeCounter:
        """A counter with the same thresholds and empty counts (one per worker thread; see :meth:`merge`)."""
        other = copy.copy(self)
        other._zero()
        return other

    def merge(self, other: _NegativeCounter) -> None:
        self.dense += other.dense
        self.hist += other.hist

    def add(self, tile: torch.Tensor, r0: int, r1: int, dim: int) -> None:
        """Count the negatives of rows ``r0:r1``, which lie along ``dim`` of ``tile`` (0: tile rows; 1: tile
        columns, i.e. the transposed tile); same-class entries of ``tile`` are already +inf."""
        if self.use_numpy:
            self._add_numpy(tile.numpy(), r0, r1, dim)
        else:
            self._add_torch(tile, r0, r1, dim)

    def _add_numpy(self, tile: np.ndarray, r0: int, r1: int, dim: int) -> None:
        other = 1 - dim
        thr = self._thr_np[r0:r1]
        if self._mask is None or self._mask.shape != tile.shape:
            self._mask = np.empty(tile.shape, dtype=bool)
        mask, dense = self._mask, self.dense.numpy()
        for lvl in range(self.levels):
            np.less(tile, np.expand_dims(thr[:, lvl], other), out=mask)
            dense[r0:r1, lvl] += mask.sum(axis=other, dtype=np.int32)
        np.less(tile, np.expand_dims(thr[:, self.levels], other), out=mask)
        flat = np.flatnonzero(mask)
        if flat.size == 0:
            return
        w, m = tile.shape[1], self.m
        local_rows = flat // w if dim == 0 else flat % w
        # bucket = #positives of the row at or below the (clamped) distance; histogram index row*(M+1) + bucket
        values = np.maximum(tile.reshape(-1)[flat], np.float32(0))
        bucket = (self._pd_np[r0 + local_rows] <= values[:, None]).sum(1)
        window = (r1 - r0) * (m + 1)
        hist = self.hist.numpy()[r0 * (m + 1) : r0 * (m + 1) + window]
        hist += np.bincount(local_rows * (m + 1) + bucket, minlength=window)

    def _add_torch(self, tile: torch.Tensor, r0: int, r1: int, dim: int) -> None:
        other = 1 - dim
        thr = self.thr[r0:r1]
        if self._mask is None or self._mask.shape != tile.shape:
            self._mask = torch.empty(tile.shape, dtype=torch.bool, device=tile.device)
        mask = self._mask
        for lvl in range(self.levels):
            torch.lt(tile, thr[:, lvl].unsqueeze(other), out=mask)
            self.dense[r0:r1, lvl] += mask.sum(other, dtype=torch.int32)
        torch.lt(tile, thr[:, self.levels].unsqueeze(other), out=mask)
        flat = torch.nonzero(mask.view(-1)).view(-1)
        if flat.numel() == 0:
            return
        w, m = tile.shape[1], self.m
        local_rows = torch.div(flat, w, rounding_mode="floor") if dim == 0 else torch.remainder(flat, w)
        key = _float_bits(tile.view(-1)[flat]).add_(local_rows << 32)
        # bucket = #positives of the row <= v = pos_le - row*M; histogram index row*(M+1) + bucket
        pos_le = torch.searchsorted(self.keys[r0 * m : r1 * m] - (r0 << 32), key, right=True)
        window = (r1 - r0) * (m + 1)
        self.hist[r0 * (m + 1) : r0 * (m + 1) + window] += torch.bincount(pos_le.add_(local_rows), minlength=window)

    def negatives_closer(self) -> torch.Tensor:
        """``[nq, M]``: entry j = the number of negatives strictly closer than the row's (j+1)-th positive."""
        nq = self.dense.shape[0]
        closer = self.hist.view(nq, self.m + 1).cumsum(1)[:, : self.m]
        for lvl in range(self.levels):
            idx = self.n_valid - 1 - lvl
            rows = torch.nonzero(idx >= 0).view(-1)
            closer[rows, idx[rows]] = self.dense[rows, lvl]
        return closer


def _count_tiles(tiles: list[tuple[int, int]], qa: torch.Tensor, da: torch.Tensor, members: torch.Tensor,
                 counter: _NegativeCounter, block: int, self_query: bool, workers: int) -> None:
    """Compute each ``block`` x ``block`` distance tile once and add its negatives to ``counter``.

    With ``workers > 1`` the tiles are shared out to that many threads, each running torch on one
    intra-op thread (a thread-local setting) with its own counts, merged at the end. Whole tiles per
    thread need no synchronisation between the many small operations of a tile, which matters most on a
    busy machine, where a thread team waits for its slowest member at every operation.
    """

    def run(local: _NegativeCounter, todo: Iterator[tuple[int, int]]) -> _NegativeCounter:
        for i0, j0 in todo:
            i1, j1 = min(qa.shape[0], i0 + block), min(da.shape[0], j0 + block)
            tile = qa[i0:i1] @ da[j0:j1].T  # squared L2 distances
            # same-class pairs (positives, self) never count as closer negatives; the relation is
            # symmetric, so this also serves the transposed tile
            mem = members[i0:i1]
            pr, pc = torch.nonzero((mem >= j0) & (mem < j1), as_tuple=True)
            tile[pr, mem[pr, pc] - j0] = math.inf
            local.add(tile, i0, i1, dim=0)
            if self_query and j0 != i0:  # the transposed tile serves rows j0..j1
                local.add(tile, j0, j1, dim=1)
        return local

    if workers <= 1:
        run(counter, iter(tiles))
        return
    threads = torch.get_num_threads()
    lock, stop = threading.Lock(), threading.Event()
    shared = iter(tiles)

    def next_tiles() -> Iterator[tuple[int, int]]:
        while not stop.is_set():
            with lock:
                tile = next(shared, None)
            if tile is None:
                return
            yield tile

    def worker() -> _NegativeCounter:
        torch.set_num_threads(1)  # this thread's OpenMP/MKL setting
        return run(counter.fork(), next_tiles())

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rdml-ranks") as pool:
            futures = [pool.submit(worker) for _ in range(workers)]
            try:
                results = [f.result() for f in futures]
            except BaseException:  # an error or Ctrl-C: the other workers stop after their current tile
                stop.set()
                raise
    finally:
        torch.set_num_threads(threads)  # torch gives threads it starts later the last value set
    for local in results:
        counter.merge(local)


def positive_ranks(
    query: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray | None = None,
    database_labels: np.ndarray | None = None,
    device=None,
    block: int | None = None,
    levels: int = DENSE_LEVELS,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks of every query's positives.

    Returns ``(ranks float64 [nq, M], num_pos int64 [nq])``: row i holds the sorted 1-based ranks of its
    ``num_pos[i]`` positives in columns ``< num_pos[i]`` (the rest is inf). With ``database=None`` the
    query set is its own database and each query's own index is excluded.

    ``block``: the tile side (memory ~ 5 * block² bytes; 2048 on the CPU, 8192 on CUDA). ``workers``:
    threads sharing the tiles (default: torch's thread count on the CPU, 1 on CUDA). ``levels``: see
    :data:`DENSE_LEVELS`. Neither ``workers`` nor ``levels`` changes the result.
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
    if nq == 0 or n == 0:
        return np.full((nq, max_count), np.inf), np.zeros(nq, np.int64)

    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).to(dev)
    db = q if self_query else torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(dev)
    qa = _augment(q, (q * q).sum(1), "query")
    da = _augment(db, (db * db).sum(1), "db")
    members = table.to(dev)[torch.from_numpy(qc_np).to(dev)]  # every same-class database item (self included)
    valid = members >= 0
    if self_query:
        valid &= members != torch.arange(nq, device=dev)[:, None]

    pd = _positive_distances(qa, da, members, valid)
    n_valid = valid.sum(1)
    if not bool(torch.isfinite(pd).any()):
        return np.full((nq, max_count), np.inf), num_pos
    counter = _NegativeCounter(pd, n_valid, levels, NUMPY_ON_CPU)
    tiles = [(i0, j0) for i0 in range(0, nq, block) for j0 in range(i0 if self_query else 0, n, block)]
    if workers is None:
        workers = torch.get_num_threads() if dev.type == "cpu" else 1
    _count_tiles(tiles, qa, da, members, counter, block, self_query, min(workers, len(tiles)))

    ranks = counter.negatives_closer().double() + torch.arange(1, max_count + 1, device=dev, dtype=torch.float64)
    keep = torch.arange(max_count, device=dev)[None, :] < n_valid[:, None]
    ranks = torch.where(keep, ranks, torch.full_like(ranks, math.inf))
    return ranks.cpu().numpy(), num_pos
