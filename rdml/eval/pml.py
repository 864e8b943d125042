"""pytorch-metric-learning compatibility: rdml's kNN and rdml's metrics inside PML's ``AccuracyCalculator``.

Users of pytorch-metric-learning (PML 2.x) evaluate with ``AccuracyCalculator(...).get_accuracy(query,
query_labels, reference, reference_labels, ref_includes_query)``. Two pieces plug rdml into that code:

* :data:`knn_func` (an :class:`RdmlKNN`): a ``knn_func`` for ``AccuracyCalculator(knn_func=...)``: exact
  Euclidean kNN on faiss (GPU when faiss sees one), batched over queries, the query's own item removed
  by *index* when the reference includes the queries (PML's own rule, which rdml shares);
* :class:`AccuracyCalculator`: PML's calculator with rdml's retrieval metrics added as PML metrics
  (``rdml_recall_at_1`` ... ``rdml_recall_at_8``, ``rdml_map``, ``rdml_map_at_r``), computed from the
  exact ranks of every positive (:func:`rdml.eval.retrieval.positive_ranks`), so PML code gets rdml's
  numbers, tie rule included, next to PML's own.

Where the two libraries agree and where not (checked in ``tests/test_pml_compat.py``) is written down in
``docs/api.md`` ("rdml's metrics and pytorch-metric-learning's").
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as _PMLAccuracyCalculator

from rdml.eval.knn import _as_f32, flat_index

RDML_METRICS = ("rdml_recall_at_1", "rdml_recall_at_2", "rdml_recall_at_4", "rdml_recall_at_8", "rdml_map",
                "rdml_map_at_r")


class RdmlKNN:
    """A PML ``knn_func``: ``(query, k, reference, ref_includes_query) -> (squared distances, indices)``.

    With ``ref_includes_query`` the first ``len(query)`` reference rows are the queries; row i's own
    index i is dropped from its k+1 neighbours (if a duplicate pushed it out, the last neighbour is
    dropped instead), as PML's ``FaissKNN`` does. Results are torch tensors on the query's device.
    """

    def __init__(self, batch_size: int = 16384) -> None:
        self.batch_size = batch_size

    def __call__(self, query, k: int, reference=None, ref_includes_query: bool = False):
        device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
        q = _as_f32(query)
        ref = q if reference is None else _as_f32(reference)
        kk = min(k + int(ref_includes_query), ref.shape[0])
        index = flat_index(ref, kk)
        out_d = np.empty((q.shape[0], kk - int(ref_includes_query)), np.float32)
        out_i = np.empty((q.shape[0], kk - int(ref_includes_query)), np.int64)
        for s in range(0, q.shape[0], self.batch_size):
            d, i = index.search(q[s : s + self.batch_size], kk)
            if ref_includes_query:
                drop = i == np.arange(s, s + len(i))[:, None]
                drop[~drop.any(axis=1), -1] = True
                d, i = d[~drop].reshape(len(i), kk - 1), i[~drop].reshape(len(i), kk - 1)
            out_d[s : s + len(i)], out_i[s : s + len(i)] = d, i
        return torch.from_numpy(out_d).to(device), torch.from_numpy(out_i).to(device)


knn_func = RdmlKNN()
"""The shared instance: ``AccuracyCalculator(knn_func=rdml.eval.pml.knn_func)``."""


class AccuracyCalculator(_PMLAccuracyCalculator):
    """PML's ``AccuracyCalculator`` (same arguments) with rdml's metrics as extra PML metrics.

    ``rdml_recall_at_{1,2,4,8}``, ``rdml_map`` (AP over all positives of the full ranking) and
    ``rdml_map_at_r`` are rdml's :func:`rdml.eval.retrieval.retrieval_metrics` on the embeddings PML
    passes in (``include=("rdml_map",)`` selects them like any PML metric). The default ``knn_func`` is
    :data:`knn_func`. With ``ref_includes_query`` the reference must be the query set itself (rdml's
    self-query protocol); a reference that only starts with the queries is refused.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("knn_func", knn_func)
        super().__init__(*args, **kwargs)
        self._rdml_cache: dict | None = None

    def _get_accuracy(self, function_dict, **kwargs):
        self._rdml_cache = None  # one rdml evaluation per get_accuracy call, shared by the rdml_* metrics
        return super()._get_accuracy(function_dict, **kwargs)

    def _rdml(self, query, reference, query_labels, reference_labels, ref_includes_query, **_) -> dict:
        if self._rdml_cache is None:
            from rdml.eval.retrieval import retrieval_metrics

            q, ql = query.detach().cpu().numpy(), query_labels.detach().cpu().numpy().astype(np.int64)
            if ref_includes_query:
                if len(reference) != len(query):
                    raise ValueError("rdml's metrics exclude a query's own item only when the reference *is* the "
                                     "query set; pass reference=None (or the queries) or ref_includes_query=False")
                self._rdml_cache = retrieval_metrics(q, ql)
            else:
                r, rl = reference.detach().cpu().numpy(), reference_labels.detach().cpu().numpy().astype(np.int64)
                self._rdml_cache = retrieval_metrics(q, ql, r, rl)
        return self._rdml_cache

    def calculate_rdml_recall_at_1(self, **kwargs) -> float:
        return self._rdml(**kwargs)["recall@1"]

    def calculate_rdml_recall_at_2(self, **kwargs) -> float:
        return self._rdml(**kwargs)["recall@2"]

    def calculate_rdml_recall_at_4(self, **kwargs) -> float:
        return self._rdml(**kwargs)["recall@4"]

    def calculate_rdml_recall_at_8(self, **kwargs) -> float:
        return self._rdml(**kwargs)["recall@8"]

    def calculate_rdml_map(self, **kwargs) -> float:
        return self._rdml(**kwargs)["map"]

    def calculate_rdml_map_at_r(self, **kwargs) -> float:
        return self._rdml(**kwargs)["map@r"]
