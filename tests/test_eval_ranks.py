"""The one-pass rank computation (rdml.eval.ranks) against the implementation it replaced and against a
brute-force ranking in exact arithmetic.

``reference_positive_ranks`` is the previous ``rdml.eval.retrieval.positive_ranks``, kept here only as a
reference: the new pass must give bit-identical ranks (so R@k, mAP and mAP@R are unchanged), whatever
the number of threads, the dense levels, the tile size or the library that counts (numpy or torch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdml.eval import ranks as ranks_mod
from rdml.eval.ranks import _augment, _class_table, _float_bits, positive_ranks
from rdml.eval.retrieval import metrics_from_ranks, retrieval_metrics


def reference_positive_ranks(query, query_labels, database=None, database_labels=None, block=2048):
    """The previous implementation (bucket every negative closer than the farthest positive), verbatim."""
    inf = float("inf")
    self_query = database is None
    if self_query:
        database, database_labels = query, query_labels
    dev = torch.device("cpu")
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
    q_sq, db_sq = (q * q).sum(1), (db * db).sum(1)
    qa = _augment(q, q_sq, "query")
    da = _augment(db, db_sq, "db")
    qc = torch.from_numpy(qc_np).to(dev)
    table = table.to(dev)
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
    hi_row = torch.where(valid.any(1), pd.masked_fill(~torch.isfinite(pd), -inf).amax(1),
                         torch.full_like(pd[:, 0], -inf))
    if not bool(torch.isfinite(hi_row).any()):
        return np.full((nq, max_count), np.inf), num_pos
    keys = (torch.arange(nq, device=dev, dtype=torch.int64)[:, None] << 32) + _float_bits(pd)
    keys = keys.reshape(-1)
    hist = torch.zeros(nq * (max_count + 1), dtype=torch.int64, device=dev)

    def count(local_rows, vals, r0, r1):
        if local_rows.numel() == 0:
            return
        local_keys = keys[r0 * max_count : r1 * max_count] - (r0 << 32)
        key = _float_bits(vals).add_(local_rows << 32)
        pos_le = torch.searchsorted(local_keys, key, right=True)
        window = (r1 - r0) * (max_count + 1)
        hist[r0 * (max_count + 1) : r0 * (max_count + 1) + window] += torch.bincount(
            pos_le.add_(local_rows), minlength=window
        )

    members = pos
    for i0 in range(0, nq, block):
        i1 = min(nq, i0 + block)
        thr_rows = hi_row[i0:i1, None]
        mem = members[i0:i1]
        for j0 in range(i0 if self_query else 0, n, block):
            j1 = min(n, j0 + block)
            w = j1 - j0
            tile = qa[i0:i1] @ da[j0:j1].T
            inside = (mem >= j0) & (mem < j1)
            pr, pc = torch.nonzero(inside, as_tuple=True)
            tile[pr, mem[pr, pc] - j0] = inf
            flat_tile = tile.view(-1)
            flat = torch.nonzero((tile < thr_rows).view(-1)).view(-1)
            count(torch.div(flat, w, rounding_mode="floor"), flat_tile[flat], i0, i1)
            if self_query and j0 != i0:
                flat = torch.nonzero((tile < hi_row[None, j0:j1]).view(-1)).view(-1)
                count(torch.remainder(flat, w), flat_tile[flat], j0, j1)
    neg_closer = hist.view(nq, max_count + 1).cumsum(1)[:, :max_count]
    ranks = neg_closer.double() + torch.arange(1, max_count + 1, device=dev, dtype=torch.float64)
    keep = torch.arange(max_count, device=dev)[None, :] < valid.sum(1, keepdim=True)
    ranks = torch.where(keep, ranks, torch.full_like(ranks, inf))
    return ranks.cpu().numpy(), num_pos


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, classes: int, dim: int = 32, noise: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SOP-like: classes of a few items, noisy enough that positives sit deep in the ranking."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    rng.shuffle(labels)
    centres = unit(rng.normal(size=(classes, dim)))
    return unit(centres[labels] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)), labels


def with_duplicates(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact copies of some items under their own and under other classes (zero and rounding-negative
    distances, positive/negative ties), plus singleton classes (queries without positives)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(x), 60, replace=False)
    other = (y[src[30:]] + 1 + rng.integers(0, 5, 30)) % (y.max() + 1)
    singles = y.max() + 1 + np.arange(10)
    x2 = np.concatenate([x, x[src], x[rng.choice(len(x), 10)]])
    y2 = np.concatenate([y, y[src[:30]], other, singles])
    perm = rng.permutation(len(y2))
    return x2[perm], y2[perm]


def assert_same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    assert a[0].shape == b[0].shape
    np.testing.assert_array_equal(a[0], b[0])  # bit-identical, inf pads included
    np.testing.assert_array_equal(a[1], b[1])


@pytest.fixture(scope="module")
def sop_like():
    """Over two 2048-tiles per side, so diagonal, off-diagonal, transposed and partial tiles all occur."""
    return with_duplicates(*clustered(4300, 900))


def test_default_pass_equals_previous_implementation(sop_like):
    x, y = sop_like
    ref = reference_positive_ranks(x, y)
    assert np.isfinite(ref[0]).sum() > len(y)  # a real test: many positives, deep ranks
    assert np.nanmax(np.where(np.isfinite(ref[0]), ref[0], np.nan)) > 100
    assert_same(positive_ranks(x, y), ref)
    m = retrieval_metrics(x, y)
    assert m == metrics_from_ranks(*ref)  # exactly the same floats


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("levels", [0, 1, 2, 5])
def test_threads_and_levels_do_not_change_ranks(sop_like, workers, levels):
    x, y = sop_like
    x, y = x[:1500], y[:1500]
    ref = reference_positive_ranks(x, y, block=256)
    threads = torch.get_num_threads()
    assert_same(positive_ranks(x, y, block=256, levels=levels, workers=workers), ref)
    assert torch.get_num_threads() == threads  # the worker threads' setting does not leak


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("block", [97, 512])
def test_numpy_and_torch_counting_agree(sop_like, monkeypatch, use_numpy, block):
    """CUDA counts with torch: the same code path, run on the CPU here."""
    monkeypatch.setattr(ranks_mod, "NUMPY_ON_CPU", use_numpy)
    x, y = sop_like
    x, y = x[:1200], y[:1200]
    assert_same(positive_ranks(x, y, block=block, levels=1, workers=2), reference_positive_ranks(x, y, block=block))


@pytest.mark.parametrize("use_numpy", [True, False])
def test_query_vs_gallery_equals_previous_implementation(monkeypatch, use_numpy):
    monkeypatch.setattr(ranks_mod, "NUMPY_ON_CPU", use_numpy)
    q, qy = clustered(700, 150, seed=1)
    g, gy = with_duplicates(*clustered(2300, 150, seed=2), seed=3)
    g = np.concatenate([g, q[:20]])  # queries' exact copies in the gallery: distance 0
    gy = np.concatenate([gy, qy[:20]])
    for block in (300, 2048):
        assert_same(positive_ranks(q, qy, g, gy, block=block), reference_positive_ranks(q, qy, g, gy, block=block))


def brute_force_ranks(x, y, gx=None, gy=None):
    """Ranks from the full distance matrix in float64; ties count for the positive."""
    self_query = gx is None
    gx, gy = (x, y) if self_query else (gx, gy)
    d = ((x[:, None, :].astype(np.float64) - gx[None].astype(np.float64)) ** 2).sum(-1)
    out = []
    for i in range(len(x)):
        same = gy == y[i]
        if self_query:
            same[i] = False
        neg = ~(gy == y[i])
        pos_d = np.sort(d[i, same])
        out.append([j + 1 + int((d[i, neg] < p).sum()) for j, p in enumerate(pos_d)])
    return out


@pytest.mark.parametrize("gallery", [False, True])
def test_exact_ties_against_brute_force(gallery):
    """Small integer coordinates: every squared distance is an exact integer in float32 and float64, so
    the ranking, its many ties included, is known exactly."""
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(900, 6)).astype(np.float32)
    y = rng.integers(0, 120, 900)
    gx, gy = (None, None) if not gallery else (rng.integers(-2, 3, size=(700, 6)).astype(np.float32),
                                               rng.integers(0, 120, 700))
    ranks, num_pos = positive_ranks(x, y, gx, gy, block=256, workers=2)
    expected = brute_force_ranks(x, y, gx, gy)
    assert sum(len(e) for e in expected) > 1000
    for i, exp in enumerate(expected):
        assert num_pos[i] == len(exp)
        np.testing.assert_array_equal(ranks[i, : len(exp)], np.asarray(exp, np.float64))
        assert np.isinf(ranks[i, len(exp) :]).all()


def test_no_positives_anywhere():
    x, _ = clustered(50, 10)
    ranks, num_pos = positive_ranks(x, np.arange(50))
    assert (num_pos == 0).all() and np.isinf(ranks).all()
    assert all(np.isnan(v) for v in retrieval_metrics(x, np.arange(50)).values())


@pytest.mark.parametrize("use_numpy", [True, False])
def test_rounding_negative_distances_tie_at_zero(monkeypatch, use_numpy):
    """Near-copies of a long vector: |q|² + |x|² - 2 q·x cancels, so the computed squared distances are
    rounding noise around 0, many negative. Distances are compared clamped at 0 (a negative that rounds
    below a positive does not beat it): the previous implementation's rule, kept."""
    monkeypatch.setattr(ranks_mod, "NUMPY_ON_CPU", use_numpy)
    rng = np.random.default_rng(7)
    groups, size = 60, 8
    base = rng.normal(size=(groups, 16)) * 300
    x = (np.repeat(base, size, 0) + 1e-4 * rng.normal(size=(groups * size, 16))).astype(np.float32)
    y = np.repeat(np.arange(groups) * 3, size) + rng.integers(0, 3, groups * size)
    ref = reference_positive_ranks(x, y, block=128)
    q = torch.from_numpy(x)
    qa, da = _augment(q, (q * q).sum(1), "query"), _augment(q, (q * q).sum(1), "db")
    assert bool(((qa @ da.T) < 0).any())  # the case this test is about
    assert_same(positive_ranks(x, y, block=128, workers=2), ref)
