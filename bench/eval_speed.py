"""rdml's benign evaluation vs pytorch-metric-learning's AccuracyCalculator, side by side in one run.

Synthetic clustered embeddings at SOP scale (60,000 x 512, 11,316 classes of ~5 images): class
centres uniform on the sphere, items = centre + Gaussian noise, L2-normalised. Both sides use faiss
(exact L2 search, k-means with 20 iterations and the same seed). rdml computes *more* (mAP over all
positives, R@2/4/8, ARI, clustering accuracy and F1). Timed: rdml on the same retrieval metrics
(faiss kNN, ``full_map=False``) plus its full clustering metrics, and separately rdml's exact
mAP of the full ranking (``full_map=True``, the default of ``benign_metrics``).

    nice python bench/eval_speed.py            # full size (a few minutes on 2 cores)
    python bench/eval_speed.py --n 6000        # quick try (classes scale with n)
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--classes", type=int, default=None, help="default: 11316 * n / 60000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=2.5, help="noise norm relative to the unit class centre")
    ap.add_argument("--seed", type=int, default=1234, help="data and k-means seed (PML's FaissKMeans default)")
    ap.add_argument("--no-full-map", action="store_true", help="skip the exact mAP over all positives")
    args = ap.parse_args()
    classes = args.classes or max(2, round(11_316 * args.n / 60_000))

    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans

    from rdml.eval import clustering_metrics, retrieval_metrics

    emb, labels = synthetic(args.n, classes, args.dim, args.noise, args.seed)
    print(f"data: {args.n} x {args.dim}, {classes} classes, torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    ours = retrieval_metrics(emb, labels, full_map=False)
    t_knn = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours.update(clustering_metrics(emb, labels, seed=args.seed))
    t_clu = time.perf_counter() - t0
    t_ours = t_knn + t_clu
    print(f"rdml  : {t_ours:8.1f} s  (R@k + mAP@R via faiss kNN {t_knn:.1f} s, k-means + NMI/ARI/ACC/F1 {t_clu:.1f} s)")
    t_full = None
    if not args.no_full_map:
        t0 = time.perf_counter()
        full = retrieval_metrics(emb, labels, full_map=True)
        t_rank = time.perf_counter() - t0
        t_full = t_rank + t_clu
        print(f"rdml full: {t_full:8.1f} s  (exact ranks of all positives incl. mAP {t_rank:.1f} s + clustering)")
        ours["map"] = full["map"]
        tie = max(abs(full[k] - ours[k]) for k in ("recall@1", "map@r"))
        print(f"  exact-rank vs kNN path: max |diff| R@1/mAP@R = {tie:.2e} (float32 near-ties only)")

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=torch.device("cpu"),
        kmeans_func=FaissKMeans(niter=20, seed=args.seed),
    )
    t0 = time.perf_counter()
    theirs = calc.get_accuracy(emb, labels)
    t_pml = time.perf_counter() - t0
    print(f"pml   : {t_pml:8.1f} s")

    pairs = {"recall@1": "precision_at_1", "map@r": "mean_average_precision_at_r", "nmi": "NMI"}
    diffs = {k: abs(ours[k] - theirs[v]) for k, v in pairs.items()}
    for k, v in pairs.items():
        print(f"  {k:9s} rdml {ours[k]:.6f}  pml {theirs[v]:.6f}  |diff| {diffs[k]:.2e}")
    print("  rdml only: " + ", ".join(f"{k} {ours[k]:.4f}" for k in ("recall@8", "map", "ari", "cluster_acc", "cluster_f1")))
    print(f"time ratio rdml/pml = {t_ours / t_pml:.3f}   max |diff| = {max(diffs.values()):.2e}")
    if t_full is not None:
        print(f"time ratio rdml-full/pml = {t_full / t_pml:.3f} (rdml-full also computes the exact mAP of the full ranking)")


if __name__ == "__main__":
    main()
