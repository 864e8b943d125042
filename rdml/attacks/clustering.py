"""Clustering attacks (EAT threat model, eat-panum.md A.3): every sample of the clustered set moves.

k-means is not differentiable, so the attacks are surrogates handed to the one PGD engine:

* **centroid margin** (default): maximise ||g(x~) - c_t||^2 - min_{k != t} ||g(x~) - c_k||^2, i.e. push
  each sample away from its own centroid and towards the nearest other one. ``centroids="class"``:
  t = label, c = clean class means (label-aware attacker); ``centroids="kmeans"``: t = clean k-means
  assignment, c = clean k-means centroids (label-free attacker). ``margin`` clips the gain.
* **dynamic centroids**: the same margin, but the centroids are recomputed (detached) from the current
  perturbed embeddings after every PGD step, because all points move together. This needs every
  embedding at every step, so the outer loop is over steps and the inner over batches: one engine
  call of one step per batch, started from the batch's previous iterate (``pgd(start=...)``). The
  engine's own final evaluation supplies the new embeddings, so a step costs one forward+backward
  plus one forward per sample. The current adversarial images of the whole set are kept on the CPU
  (N x C x H x W floats: 3.5 GB for CUB at 224 px).
* **embedding shift**: maximise ||g(x~) - g(x)||^2; needs neither labels nor centroids.

With fixed centroids and BN in eval mode the loss is per-sample, so those attacks run batch by batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.attacks.profiles import AttackSpec
from rdml.attacks.ranking import ES_OFFSET
from rdml.attacks.runner import attack_generator, iter_batches


@dataclass
class ClusteringOutcome:
    """Adversarial embeddings of the whole clustered set and what they cost."""

    key: str
    spec: AttackSpec
    adv_emb: np.ndarray  # [n, D]
    passes: int
    seconds: float


def class_centroids(emb: Tensor, groups: Tensor, k: int) -> Tensor:
    """Means [k, D] of ``emb`` per group id in 0..k-1 (an empty group gets a zero row)."""
    sums = torch.zeros(k, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, groups, emb)
    counts = torch.bincount(groups, minlength=k).clamp_min(1).to(emb.dtype)
    return sums / counts.unsqueeze(1)


def kmeans_centroids(emb: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """faiss k-means on the clean embeddings: (centroids [k, D], assignment [n])."""
    import faiss

    x = np.ascontiguousarray(emb.detach().cpu().numpy().astype(np.float32))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return torch.from_numpy(km.centroids).to(emb), torch.from_numpy(assign[:, 0].astype(np.int64)).to(emb.device)


def centroid_margin_loss(emb: Tensor, centroids: Tensor, target: Tensor, margin: float | None = None) -> Tensor:
    """Per-sample loss (minimised) = -(||e - c_t||^2 - min_{k != t} ||e - c_k||^2), clipped at ``margin``."""
    d2 = torch.cdist(emb, centroids).pow(2)
    own = d2.gather(1, target.view(-1, 1)).squeeze(1)
    other = d2.scatter(1, target.view(-1, 1), float("inf")).min(dim=1).values
    gain = own - other
    if margin is not None:
        gain = gain.clamp(max=margin)
    return -gain


def run_clustering_attack(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    spec: AttackSpec,
    clean_emb: Tensor,
    labels: Tensor,
    *,
    key: str | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> ClusteringOutcome:
    """Attack the set ``dataset[indices]`` (clean embeddings ``clean_emb``, labels 0..K-1 ``labels``)."""
    key = key or spec.base_name
    started = time.perf_counter()
    gen = attack_generator(seed, key)
    k = int(labels.max().item()) + 1
    if spec.kind == "CENTROID":
        if spec.centroids == "class":
            groups, centroids = labels, class_centroids(clean_emb, labels, k)
        else:
            centroids, groups = kmeans_centroids(clean_emb, k, seed)
    else:
        groups, centroids = labels, None
    if spec.kind == "CENTROID" and spec.dynamic:
        adv, passes = _dynamic(model, dataset, indices, spec, groups, centroids, k, batch_size, device, gen, progress, key)
    else:
        adv, passes = _static(model, dataset, indices, spec, clean_emb, groups, centroids, batch_size, device, gen,
                              progress, key)
    return ClusteringOutcome(key, spec, adv.cpu().numpy(), passes, time.perf_counter() - started)


def _static(model, dataset, indices, spec, clean_emb, groups, centroids, batch_size, device, gen, progress, key):
    out, passes, start = [], 0, 0
    total = (len(indices) + batch_size - 1) // batch_size
    with frozen_eval(model):
        for images, _ in tqdm(iter_batches(dataset, indices, batch_size), total=total, desc=key,
                              disable=not progress, leave=False):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            stash: dict[str, Tensor] = {}
            if spec.kind == "SHIFT":
                noise = torch.randint(-1, 2, clean_emb[rows].shape, generator=gen).to(clean_emb)
                ref = clean_emb[rows] + ES_OFFSET * noise

                def objective(x, ref=ref, stash=stash):
                    e = model(x)
                    stash["emb"] = e.detach()
                    return -((e - ref) ** 2).sum(dim=1)
            else:
                target = groups[rows]

                def objective(x, target=target, stash=stash):
                    e = model(x)
                    stash["emb"] = e.detach()
                    return centroid_margin_loss(e, centroids, target, spec.margin)

            res = pgd(objective, x0, spec.budget, generator=gen)
            passes += res.passes
            if spec.restarts > 1 or "emb" not in stash:
                with torch.no_grad():
                    stash["emb"] = model(res.x_adv)
            out.append(stash["emb"])
    return torch.cat(out), passes


def _dynamic(model, dataset, indices, spec, groups, centroids, k, batch_size, device, gen, progress, key):
    budget = spec.budget
    if budget.eps == 0 or budget.steps == 0:
        one = spec.model_copy(update={"steps": 0})
        return _static(model, dataset, indices, one, None, groups, centroids, batch_size, device, gen, progress, key)
    step_budget = Budget(budget.eps, budget.alpha, 1, budget.norm, budget.random_start, 1)
    current: list[Tensor | None] = [None] * ((len(indices) + batch_size - 1) // batch_size)
    passes = 0
    emb = None
    with frozen_eval(model):
        for _ in tqdm(range(budget.steps), desc=key, disable=not progress, leave=False):
            out, start = [], 0
            for b, (images, _) in enumerate(iter_batches(dataset, indices, batch_size)):
                x0 = images.to(device)
                target = groups[start : start + len(x0)]
                start += len(x0)
                stash: dict[str, Tensor] = {}

                def objective(x, target=target, stash=stash, c=centroids):
                    e = model(x)
                    stash["emb"] = e.detach()
                    return centroid_margin_loss(e, c, target, spec.margin)

                begin = None if current[b] is None else current[b].to(device)
                res = pgd(objective, x0, step_budget, generator=gen, start=begin)
                passes += res.passes
                current[b] = res.x_adv.cpu()
                out.append(stash["emb"])
            emb = torch.cat(out)
            centroids = class_centroids(emb, groups, k)  # detached: computed from stashed embeddings
    return emb, passes
