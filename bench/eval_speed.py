"""rdml's full benign evaluation vs pytorch-metric-learning's AccuracyCalculator, side by side in one run.

Synthetic clustered embeddings at SOP scale (60,000 x 512, 11,316 classes of ~5 images): class
centres uniform on the sphere, items = centre + Gaussian noise, L2-normalised. Both sides cluster with
faiss k-means (20 iterations, the same seed).

* rdml: :func:`rdml.eval.benign_metrics`, what training, ``rdml evaluate`` and Tune report: R@1/2/4/8,
  the mAP over *all* positives and mAP@R from one blocked pass over the distance matrix (the exact
  rank of every positive, :func:`rdml.eval.retrieval.positive_ranks`), then NMI, ARI, clustering
  accuracy and F1.
* PML: ``AccuracyCalculator(include=(precision_at_1, mean_average_precision_at_r, NMI),
  k="max_bin_count")``: a faiss kNN list as long as the largest class, k-means and NMI. It computes
  less (no mAP of the full ranking, no R@2/4/8, ARI, accuracy or F1).

Each side runs ``--repeats`` times, interleaved (rdml, PML, rdml, PML...); the best wall time of each
counts, and every run's wall and CPU seconds are printed, with the load average before and after (the
machine may be shared: CPU seconds, all threads together, are the less load-dependent part; the least
of each side is compared too). The retrieval values (R@1, mAP@R) agree up to float32 near-ties: faiss
computes its distances in another order than rdml's pass, which is bit-identical to rdml's previous one. ``--knn`` also times rdml's faiss
kNN path (``full_map=False``: no full-ranking mAP).

    nice python bench/eval_speed.py --repeats 2     # full size (several minutes on 2 cores)
    python bench/eval_speed.py --n 6000             # quick try (classes scale with n)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def synthetic(n: int, num_classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    rng.shuffle(labels)
    centres = rng.normal(size=(num_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--classes", type=int, default=None, help="default: 11316 * n / 60000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=2.5, help="noise norm relative to the unit class centre")
    ap.add_argument("--seed", type=int, default=1234, help="data and k-means seed (PML's FaissKMeans default)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of each side; the best counts")
    ap.add_argument("--knn", action="store_true", help="also time rdml's faiss kNN path (no full-ranking mAP)")
    args = ap.parse_args()
    classes = args.classes or max(2, round(11_316 * args.n / 60_000))

    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans

    from rdml.eval import benign_metrics, retrieval_metrics

    emb, labels = synthetic(args.n, classes, args.dim, args.noise, args.seed)
    print(f"data: {args.n} x {args.dim}, {classes} classes, torch threads {torch.get_num_threads()}; "
          f"load average (1/5/15 min) {load()}", flush=True)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=torch.device("cpu"),
        kmeans_func=FaissKMeans(niter=20, seed=args.seed),
    )
    walls: dict[str, list[float]] = {"rdml": [], "pml": []}
    cpus: dict[str, list[float]] = {"rdml": [], "pml": []}
    ours: dict[str, float] = {}
    theirs: dict[str, float] = {}
    for rep in range(args.repeats):
        ours, wall, cpu = timed(lambda: benign_metrics(emb, labels, seed=args.seed))
        walls["rdml"].append(wall)
        cpus["rdml"].append(cpu)
        print(f"[{rep}] rdml full: {wall:8.1f} s wall {cpu:8.1f} s CPU  (R@1/2/4/8, mAP, mAP@R, NMI, ARI, ACC, F1)"
              f"  load {load()}", flush=True)
        theirs, wall, cpu = timed(lambda: calc.get_accuracy(emb, labels))
        walls["pml"].append(wall)
        cpus["pml"].append(cpu)
        print(f"[{rep}] pml      : {wall:8.1f} s wall {cpu:8.1f} s CPU  (precision@1, mAP@R, NMI)"
              f"  load {load()}", flush=True)
    if args.knn:
        knn, wall, cpu = timed(lambda: retrieval_metrics(emb, labels, full_map=False))
        tie = max(abs(knn[k] - ours[k]) for k in ("recall@1", "map@r"))
        print(f"rdml kNN path (retrieval only, no mAP): {wall:.1f} s wall {cpu:.1f} s CPU; "
              f"max |diff| R@1/mAP@R vs the rank pass {tie:.2e}")

    pairs = {"recall@1": "precision_at_1", "map@r": "mean_average_precision_at_r", "nmi": "NMI"}
    diffs = {k: abs(ours[k] - theirs[v]) for k, v in pairs.items()}
    for k, v in pairs.items():
        print(f"  {k:9s} rdml {ours[k]:.6f}  pml {theirs[v]:.6f}  |diff| {diffs[k]:.2e}")
    print("  rdml only: " + ", ".join(f"{k} {ours[k]:.4f}" for k in ("recall@8", "map", "ari", "cluster_acc", "cluster_f1")))
    best = {k: min(v) for k, v in walls.items()}
    cpu = {k: min(v) for k, v in cpus.items()}
    print(f"best wall: rdml full {best['rdml']:.1f} s, pml {best['pml']:.1f} s; "
          f"time ratio rdml-full/pml = {best['rdml'] / best['pml']:.3f}   max |diff| = {max(diffs.values()):.2e}")
    print(f"least CPU: rdml full {cpu['rdml']:.1f} s, pml {cpu['pml']:.1f} s; CPU ratio {cpu['rdml'] / cpu['pml']:.3f}")
    print(f"load average at the end {load()}")


if __name__ == "__main__":
    main()
