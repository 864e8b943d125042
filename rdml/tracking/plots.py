"""Figures logged with every run: training curves and a 2-D picture of the test embedding.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so no GUI backend or
global figure state is involved and plotting works in Ray workers and threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _series(history: Sequence[Mapping[str, Any]], match: Any) -> dict[str, tuple[list[float], list[float]]]:
    """``{key: (epochs, values)}`` for every numeric key of the per-epoch history accepted by ``match``."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(history):
        x = float(row.get("epoch", i + 1))
        for key, value in row.items():
            if key == "epoch" or not match(key) or isinstance(value, bool):
                continue
            try:
                y = float(value)
            except (TypeError, ValueError):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(x)
            ys.append(y)
    return out


def _is_loss(key: str) -> bool:
    return key.rsplit("/", 1)[-1].endswith("loss")


def _is_quality(key: str) -> bool:
    leaf = key.rsplit("/", 1)[-1]
    return leaf in ("recall@1", "recall_at_1", "nmi", "ers", "r@1")


def _line_figure(series: dict[str, tuple[list[float], list[float]]], title: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Every ``*loss`` key of the per-epoch history against the epoch."""
    return _line_figure(_series(history, _is_loss), "training loss", "loss")


def quality_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Recall@1, NMI (and ERS where evaluated) against the epoch."""
    return _line_figure(_series(history, _is_quality), "R@1 / NMI", "fraction")


def pca_2d(emb: np.ndarray) -> np.ndarray:
    """Project rows of ``emb`` onto their first two principal components."""
    x = np.asarray(emb, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    return proj


def embedding_figure(emb: np.ndarray, labels: np.ndarray, title: str = "test embedding (PCA)") -> Figure:
    """Scatter of the 2-D PCA of ``emb`` coloured by class."""
    xy = pca_2d(emb)
    labels = np.asarray(labels)
    fig = Figure(figsize=(5.5, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    classes = np.unique(labels)
    cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "nipy_spectral"
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, s=6, alpha=0.8)
    if len(classes) <= 20:
        ax.legend(*sc.legend_elements(), title="class", fontsize=7, loc="best", markerscale=0.8)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    return fig


def pareto_figure(
    points: Sequence[Mapping[str, Any]], x: str, y: str, front: Sequence[Mapping[str, Any]], label_key: str | None = None
) -> Figure:
    """All trials as points, the Pareto front highlighted and connected."""
    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([p[x] for p in points], [p[y] for p in points], s=25, color="0.6", label="trials")
    fr = sorted(front, key=lambda p: p[x])
    ax.plot([p[x] for p in fr], [p[y] for p in fr], "o-", color="C3", label="Pareto front")
    if label_key:
        for p in fr:
            ax.annotate(str(p.get(label_key, "")), (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
