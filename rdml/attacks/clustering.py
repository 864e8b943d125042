"""Clustering attacks (the threat model of EAT: Ke, "Towards Adversarially Robust Deep Metric Learning",
arXiv 2501.01025): there is no clean gallery, so every sample of the clustered set moves.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rdml.attacks.base import Attack
from rdml.attacks.inputs import as_dataset, dataset_labels, model_device, prepare_model
from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.attacks.profiles import AttackSpec
from rdml.attacks.ranking import ES_OFFSET
from rdml.attacks.runner import attack_generator, embed_indices, iter_batches

CLUSTER_METRICS = ("nmi", "ari", "cluster_acc", "cluster_f1", "recall@1")
"""What a clustering attack is scored with: the benign clustering metrics (and R@1) of the attacked set."""


@dataclass
class ClusteringOutcome:
    """Adversarial embeddings of the whole clustered set and what they cost.

    ``values`` are the clustering metrics (:data:`CLUSTER_METRICS`, fractions) of the adversarial
    embeddings and ``clean`` those of the clean ones, when computed (the attack object's ``__call__``
    and :func:`attack_clusters` do); ``adv`` the adversarial inputs when kept.
    """

    key: str
    spec: AttackSpec
    adv_emb: np.ndarray  # [n, D]
    passes: int
    seconds: float
    adv_images: Tensor | None = None
    values: dict[str, float] = field(default_factory=dict)
    clean: dict[str, float] = field(default_factory=dict)

    @property
    def adv(self) -> Tensor | None:
        return self.adv_images

    @property
    def mean(self) -> dict[str, float]:
        """The reported numbers (set-level clustering metrics of the adversarial embeddings)."""
        return dict(self.values)


def class_centroids(emb: Tensor, groups: Tensor, k: int) -> Tensor:
    """Means [k, D] of ``emb`` per group id in 0..k-1 (an empty group gets a zero row)."""
    sums = torch.zeros(k, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, groups, emb)
    counts = torch.bincount(groups, minlength=k).clamp_min(1).to(emb.dtype)
    return sums / counts.unsqueeze(1)


def kmeans_centroids(emb: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """faiss k-means on the clean embeddings: (centroids [k, D], assignment [n])."""
    import faiss

    x = np.ascontiguousarray(emb.detach().cpu().numpy().astype(np.float32))
    # min_points_per_centroid=1 only silences faiss's "please provide at least ... points" warning on the
    # small attacked sets (it changes no result); the sampling cap stays faiss's default
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
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


class ClusteringAttack(Attack):
    """Base of the clustering attacks: every sample of the set is perturbed, the set is re-clustered.

    Called on a model and a set of images with labels (``atk(model, images, labels)``), it returns a
    :class:`ClusteringOutcome` with the adversarial inputs and the clustering metrics before and after.
    There is no gallery: the attacked set is the clustered set.
    """

    threat = "clustering"
    reports: dict = {}  # clustering attacks report the benign clustering metrics of the attacked set

    def targets(self, clean_emb: Tensor, labels: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor | None]:
        """(group of every sample, centroids or None)."""
        return labels, None

    def objective(self, model: nn.Module, rows: slice, clean_emb: Tensor | None, groups: Tensor,
                  centroids: Tensor | None, generator: torch.Generator, stash: dict[str, Tensor]):
        raise NotImplementedError

    def run(self, model: nn.Module, dataset: Dataset, indices: Sequence[int], clean_emb: Tensor, labels: Tensor, *,
            key: str | None = None, batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0,
            progress: bool = True, keep_images: bool = False) -> ClusteringOutcome:
        """Attack the set ``dataset[indices]`` (clean embeddings ``clean_emb``, labels 0..K-1 ``labels``)."""
        key = key or self.key
        started = time.perf_counter()
        gen = attack_generator(seed, key)
        k = int(labels.max().item()) + 1
        groups, centroids = self.targets(clean_emb, labels, k, seed)
        kept: list[Tensor] | None = [] if keep_images else None
        if self.spec.dynamic and self.kind == "CENTROID":
            adv, passes = self._dynamic(model, dataset, indices, groups, centroids, k, batch_size, device, gen,
                                        progress, key, kept)
        else:
            adv, passes = self._static(model, dataset, indices, clean_emb, groups, centroids, batch_size, device, gen,
                                       progress, key, kept)
        return ClusteringOutcome(key, self.spec, adv.cpu().numpy(), passes, time.perf_counter() - started,
                                 adv_images=torch.cat(kept) if kept else None)

    def _static(self, model, dataset, indices, clean_emb, groups, centroids, batch_size, device, gen, progress, key,
                kept: list[Tensor] | None):
        out, passes, start = [], 0, 0
        total = (len(indices) + batch_size - 1) // batch_size
        with frozen_eval(model):
            for images, _ in tqdm(iter_batches(dataset, indices, batch_size), total=total, desc=key,
                                  disable=not progress, leave=False):
                x0 = images.to(device)
                rows = slice(start, start + len(x0))
                start += len(x0)
                stash: dict[str, Tensor] = {}
                objective = self.objective(model, rows, clean_emb, groups, centroids, gen, stash)
                res = pgd(objective, x0, self.budget, generator=gen)
                passes += res.passes
                if self.restarts > 1 or "emb" not in stash:
                    with torch.no_grad():
                        stash["emb"] = model(res.x_adv)
                out.append(stash["emb"])
                if kept is not None:
                    kept.append(res.x_adv.cpu())
        return torch.cat(out), passes

    def _dynamic(self, model, dataset, indices, groups, centroids, k, batch_size, device, gen, progress, key,
                 kept: list[Tensor] | None):
        raise NotImplementedError

    def __call__(self, model: nn.Module, queries: Any, labels: Any = None, *, gallery: Any = None,
                 batch_size: int = 128, device: str | torch.device | None = None, seed: int = 0,
                 normalize: bool | None = None, keep_images: bool = True, progress: bool = False) -> ClusteringOutcome:
        """Attack every image of the set and re-cluster it; ``values`` / ``clean``: metrics after / before.

        ``queries``: images [n, C, H, W] in [0, 1] with ``labels``, or a dataset. ``normalize``: as for
        the ranking attacks (None: L2-normalise a model whose output is not normalised).
        """
        from rdml.errors import ConfigError

        if gallery is not None:
            raise ConfigError(f"{type(self).__name__} perturbs every sample of the clustered set and has no gallery: "
                              "call it on the set alone, atk(model, images, labels)")
        data = as_dataset(queries, labels, "images")
        device = torch.device(device) if device is not None else model_device(model)
        model = prepare_model(model, data, normalize, batch_size, device)
        clean, outcomes = attack_clusters([self], model, data, np.arange(len(data)), dataset_labels(data),  # type: ignore[arg-type]
                                          batch_size=batch_size, device=device, seed=seed, progress=progress,
                                          keep_images=keep_images)
        return outcomes[0]


class CentroidAttack(ClusteringAttack):
    """CENTROID: the centroid-margin surrogate (``centroids`` 'class' or 'kmeans', ``dynamic``, ``margin``)."""

    kind = "CENTROID"
    options = ("centroids", "dynamic", "margin")

    def targets(self, clean_emb: Tensor, labels: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor | None]:
        if self.spec.centroids == "class":
            return labels, class_centroids(clean_emb, labels, k)
        centroids, groups = kmeans_centroids(clean_emb, k, seed)
        return groups, centroids

    def objective(self, model, rows, clean_emb, groups, centroids, generator, stash):
        target = groups[rows]
        margin = self.spec.margin

        def objective(x, target=target, stash=stash):
            e = model(x)
            stash["emb"] = e.detach()
            return centroid_margin_loss(e, centroids, target, margin)

        return objective

    def _dynamic(self, model, dataset, indices, groups, centroids, k, batch_size, device, gen, progress, key, kept):
        budget = self.budget
        if budget.eps == 0 or budget.steps == 0:
            one = self.with_budget(steps=0)
            return one._static(model, dataset, indices, None, groups, centroids, batch_size, device, gen, progress,
                               key, kept)
        step_budget = Budget(budget.eps, budget.alpha, 1, budget.norm, budget.random_start, 1)
        current: list[Tensor | None] = [None] * ((len(indices) + batch_size - 1) // batch_size)
        passes = 0
        emb = None
        margin = self.spec.margin
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
                        return centroid_margin_loss(e, c, target, margin)

                    begin = None if current[b] is None else current[b].to(device)
                    res = pgd(objective, x0, step_budget, generator=gen, start=begin)
                    passes += res.passes
                    current[b] = res.x_adv.cpu()
                    out.append(stash["emb"])
                emb = torch.cat(out)
                centroids = class_centroids(emb, groups, k)  # detached: computed from stashed embeddings
        if kept is not None:
            kept.extend(c for c in current if c is not None)
        return emb, passes


class ClusterShiftAttack(ClusteringAttack):
    """SHIFT: push every embedding away from its clean position (needs neither labels nor centroids)."""

    kind = "SHIFT"

    def objective(self, model, rows, clean_emb, groups, centroids, generator, stash):
        # a seeded random offset per sample (not ES's constant one): every point leaves its
        # clean embedding in its own direction, which scatters clusters far more than a shared one
        noise = torch.randint(-1, 2, clean_emb[rows].shape, generator=generator).to(clean_emb)
        ref = clean_emb[rows] + ES_OFFSET * noise

        def objective(x, ref=ref, stash=stash):
            e = model(x)
            stash["emb"] = e.detach()
            return -((e - ref) ** 2).sum(dim=1)

        return objective


CLUSTERING_ATTACKS: dict[str, type[ClusteringAttack]] = {"CENTROID": CentroidAttack, "SHIFT": ClusterShiftAttack}


def build_clustering_attack(spec: AttackSpec, key: str | None = None) -> ClusteringAttack:
    if spec.kind not in CLUSTERING_ATTACKS:
        raise ValueError(f"{spec.kind} is not a clustering attack")
    return CLUSTERING_ATTACKS[spec.kind].from_spec(spec, key)  # type: ignore[return-value]


def cluster_scores(emb: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """NMI, ARI, cluster accuracy, pairwise F1 and R@1 (fractions) of a set of embeddings, from rdml.eval."""
    from rdml.eval import clustering_metrics, retrieval_metrics

    scores = dict(clustering_metrics(emb, labels, seed=seed))
    scores["recall@1"] = retrieval_metrics(emb, labels)["recall@1"]
    return {k: float(scores[k]) for k in CLUSTER_METRICS if k in scores}


def attack_clusters(attacks: Sequence[ClusteringAttack], model: nn.Module, dataset: Dataset, indices: np.ndarray,
                    labels_np: np.ndarray, *, batch_size: int, device, seed: int, progress: bool,
                    keep_images: bool = False) -> tuple[dict[str, float], list[ClusteringOutcome]]:
    """Clustering attacks on the set ``dataset[indices]``: (clean scores, one outcome per attack with its scores).

    The clean embeddings use the same batching as the attacks; labels are mapped to 0..K-1 on the set.
    """
    _, local = np.unique(labels_np[indices], return_inverse=True)
    labels = torch.as_tensor(local, dtype=torch.long, device=device)
    with frozen_eval(model):
        clean = embed_indices(model, dataset, indices, batch_size, device)
    clean_scores = cluster_scores(clean.cpu().numpy(), local, seed)
    outcomes = []
    for attack in attacks:
        outcome = attack.run(model, dataset, indices, clean, labels, key=attack.key, batch_size=batch_size,
                             device=device, seed=seed, progress=progress, keep_images=keep_images)
        outcome.values = cluster_scores(outcome.adv_emb, local, seed)
        outcome.clean = dict(clean_scores)
        outcomes.append(outcome)
    return clean_scores, outcomes
