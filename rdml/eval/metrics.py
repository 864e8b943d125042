"""Benign evaluation: the one place retrieval + clustering metrics are combined (training, Tune and
reports all call this)."""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from rdml.eval.clustering import clustering_metrics
from rdml.eval.embed import embed
from rdml.eval.retrieval import retrieval_metrics


def benign_metrics(
    emb, labels, seed: int = 0, gallery_emb=None, gallery_labels=None, full_map: bool = True
) -> dict[str, float]:
    """Retrieval (R@1/2/4/8, mAP, mAP@R) and clustering (NMI, ARI, accuracy, F1) metrics, fractions.

    With a gallery (In-Shop) retrieval is query-vs-gallery and k-means clusters the union of query
    and gallery embeddings with k = the number of classes in that union. ``full_map=False`` skips the
    exact mAP of the full ranking (``map`` is NaN) and scores a faiss kNN list instead; the full
    evaluation costs about what pytorch-metric-learning's ``AccuracyCalculator`` does on the same data
    (``bench/eval_speed.py``).
    """
    out = retrieval_metrics(emb, labels, gallery_emb, gallery_labels, full_map=full_map)
    if gallery_emb is not None:
        emb = np.concatenate([np.asarray(emb), np.asarray(gallery_emb)])
        labels = np.concatenate([np.asarray(labels), np.asarray(gallery_labels)])
    out.update(clustering_metrics(emb, labels, seed=seed))
    return out


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device="cpu",
    seed: int = 0,
    gallery: Dataset | None = None,
    full_map: bool = True,
) -> dict[str, float]:
    """Embed ``dataset`` (and ``gallery`` if given: then ``dataset`` is the query set) and score it."""
    emb, labels = embed(model, dataset, batch_size=batch_size, device=device)
    if gallery is None:
        return benign_metrics(emb, labels, seed=seed, full_map=full_map)
    g_emb, g_labels = embed(model, gallery, batch_size=batch_size, device=device)
    return benign_metrics(emb, labels, seed=seed, gallery_emb=g_emb, gallery_labels=g_labels, full_map=full_map)
