"""Evaluation: the protocol (which items query which), embeddings, exact kNN on faiss, retrieval and
clustering metrics (computed once, here)."""

from rdml.eval.clustering import (
    ari_score,
    cluster_accuracy,
    cluster_f1,
    cluster_label_metrics,
    clustering_metrics,
    kmeans,
    nmi_score,
)
from rdml.eval.embed import embed
from rdml.eval.knn import knn
from rdml.eval.metrics import benign_metrics, evaluate_model
from rdml.eval.protocol import evaluation_sets
from rdml.eval.retrieval import knn_metrics, metrics_from_ranks, positive_ranks, retrieval_metrics

__all__ = [
    "ari_score",
    "benign_metrics",
    "cluster_accuracy",
    "cluster_f1",
    "cluster_label_metrics",
    "clustering_metrics",
    "embed",
    "evaluate_model",
    "evaluation_sets",
    "kmeans",
    "knn",
    "knn_metrics",
    "metrics_from_ranks",
    "nmi_score",
    "positive_ranks",
    "retrieval_metrics",
]
