"""Run one ranking attack over a set of queries, batch by batch, through the one PGD engine.

The runner loads the attacked images in batches (never the whole set at once), lets the attack object
choose its targets from the benign gallery (``attack.setup``), perturb the batch (``attack.perturb``,
which hands ``embed -> attack.loss`` to :func:`pgd`) and measure the outcome (``attack.measure``), and
keeps the per-sample results. It knows nothing about individual attacks: what differs between them
(ES's clean reference, Panum's untouched wrong queries) lives in their classes (:mod:`rdml.attacks.ranking`).

Two entry points share the loop:

* :func:`run_ranking_attack`: rows of a dataset, against a precomputed gallery (what
  :func:`rdml.eval.robustness.evaluate_robustness` runs, queries = the test set by default);
* :func:`attack_queries`: the attack object's ``__call__``: tensors or datasets of queries, against the
  queries themselves or a separate gallery.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from rdml.attacks.inputs import as_dataset, dataset_labels, model_device, prepare_model
from rdml.attacks.pgd import frozen_eval
from rdml.attacks.profiles import AttackSpec
from rdml.attacks.ranking import Batch, Database, RankingAttack, build_ranking_attack

__all__ = ["AttackOutcome", "attack_generator", "attack_generators", "attack_queries", "batch_context", "clean_rows",
           "dataset_labels", "embed_indices", "iter_batches", "merge_outcomes", "replay_generators",
           "run_ranking_attack"]


def attack_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one attack's target sampling, stable per (eval seed, attack key)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def attack_generators(seed: int, key: str) -> tuple[torch.Generator, torch.Generator]:
    """The two generators of a ranking attack run: target sampling (``setup``) and PGD's random starts."""
    return attack_generator(seed, key), attack_generator(seed + 1, key)


def batch_context(attack: RankingAttack, model: nn.Module, x0: Tensor, self_index: Tensor, labels: Tensor,
                  db: Database, generator: torch.Generator) -> tuple[Batch, dict]:
    """A batch as the attack sees it (clean rows, its clean reference) and its targets (``attack.setup``)."""
    clean_db = clean_rows(model, x0, self_index, db)
    clean = attack.clean_reference(model, x0, clean_db)
    batch = Batch(self_index=self_index, labels=labels, clean=clean, clean_db=clean_db)
    return batch, attack.setup(db, batch, generator)


def replay_generators(attack: RankingAttack, generators: tuple[torch.Generator, torch.Generator], db: Database,
                      own: np.ndarray, labels: np.ndarray, image_shape: Sequence[int], batch_size: int,
                      batches: int) -> tuple[torch.Generator, torch.Generator]:
    """Advance an attack run's generators past its first ``batches`` batches without attacking.

    :func:`run_ranking_attack` draws, per batch, the targets (``attack.setup``) and PGD's random starts
    (``attack.skip_perturb``); both depend only on the batch's shape, its self rows and the gallery's size,
    never on embedding values (the contract of :mod:`rdml.attacks.ranking`). So the replay feeds ``setup``
    the gallery's rows (zeros for items outside it) and ``skip_perturb`` an empty batch: no image is
    loaded and the model never runs. ``own``/``labels``: per attacked item, its gallery row (-1: none)
    and its label, from the first item on.
    """
    generator, pgd_generator = generators
    device = db.emb.device
    for b in range(batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        idx = torch.as_tensor(own[rows], device=device)
        clean = torch.where((idx >= 0).view(-1, 1), db.emb[idx.clamp_min(0)], torch.zeros_like(db.emb[:1]))
        batch = Batch(self_index=idx, labels=torch.as_tensor(labels[rows], device=device), clean=clean, clean_db=clean)
        attack.setup(db, batch, generator)
        attack.skip_perturb(torch.empty((len(idx), *image_shape)), pgd_generator)
    return generator, pgd_generator


def iter_batches(dataset: Dataset, indices: Sequence[int], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, positions) batches of ``dataset[indices]`` in order; positions index ``dataset``."""
    loader = DataLoader(Subset(dataset, list(map(int, indices))), batch_size=batch_size, shuffle=False)
    start = 0
    for images, *_ in loader:
        pos = torch.as_tensor(np.asarray(indices[start : start + len(images)], dtype=np.int64))
        start += len(images)
        yield images, pos


@torch.no_grad()
def embed_indices(model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int, device) -> Tensor:
    """Embeddings [n, D] of ``dataset[indices]`` (model in eval mode, on ``device``)."""
    out = []
    with frozen_eval(model):
        for images, _ in iter_batches(dataset, indices, batch_size):
            out.append(model(images.to(device)))
    return torch.cat(out)


@dataclass
class AttackOutcome:
    """Per-sample results of one attack over the attacked samples (what an attack object returns).

    ``adv`` are the adversarial inputs (when kept), ``values`` the per-query metrics (numpy float64,
    keyed by the attack's metric key), ``mean`` their means (the reported numbers), ``targets`` the
    gallery rows each query was attacked towards or with (``[n, k]``, -1 for none; absent for ES and LTM).
    """

    key: str
    spec: AttackSpec
    indices: np.ndarray  # positions of the attacked samples in the query set (the test set by default)
    labels: np.ndarray
    values: dict[str, np.ndarray]  # metric name (prefixed with the key) -> per-sample value
    iterations: np.ndarray  # PGD steps taken per sample
    passes: int  # forward+backward passes made by the engine
    batch_passes: list[tuple[int, int]] = field(default_factory=list)  # (batch size, engine passes) per batch
    seconds: float = 0.0
    adv_images: Tensor | None = None  # all adversarial images (CPU) when asked for
    examples: dict | None = None  # a few clean/adversarial images with their top-k retrievals
    targets: np.ndarray | None = None  # [n, k] gallery rows chosen as targets (None: the attack has none)
    self_index: np.ndarray | None = None  # each query's own gallery row (-1: not in the gallery)

    def summary(self) -> dict[str, float]:
        """Mean of each per-sample metric (the reported number)."""
        return {name: float(v.mean()) if len(v) else float("nan") for name, v in self.values.items()}

    @property
    def mean(self) -> dict[str, float]:
        """The reported numbers: the mean of every per-query metric."""
        return self.summary()

    @property
    def adv(self) -> Tensor | None:
        """The adversarial inputs [n, C, H, W] (CPU), when kept."""
        return self.adv_images


def _rename(metric: str, spec: AttackSpec, key: str) -> str:
    return key + metric[len(spec.base_name) :] if metric.startswith(spec.base_name) else f"{key}:{metric}"


def _as_attack(attack: RankingAttack | AttackSpec, key: str | None) -> RankingAttack:
    if isinstance(attack, RankingAttack):
        return attack
    return build_ranking_attack(attack, key)


def run_ranking_attack(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    attack: RankingAttack | AttackSpec,
    db: Database,
    *,
    key: str | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    keep_images: bool = False,
    keep_examples: int = 0,
    topk: int = 4,
    self_index: Sequence[int] | None = None,
    labels: Sequence[int] | None = None,
    gallery_dataset: Dataset | None = None,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
) -> AttackOutcome:
    """Attack every sample in ``dataset[indices]`` with ``attack`` (an object or a spec) against the benign ``db``.

    By default ``dataset`` *is* the gallery: sample i's own row is ``db`` row i ("self", masked) and its
    label is the gallery's. For queries outside the gallery pass ``self_index`` (per attacked sample, its
    gallery row or -1), ``labels`` (per attacked sample) and, for the examples' retrieved images,
    ``gallery_dataset``. ``generators``: where this run's draws start (a shard of a longer run,
    :func:`replay_generators`); None: the run's own, :func:`attack_generators` of (``seed``, key).
    """
    atk = _as_attack(attack, key)
    spec = atk.spec
    key = key or atk.key
    generator, pgd_generator = generators if generators is not None else attack_generators(seed, key)
    labels_all = db.labels
    indices = np.asarray(indices, dtype=np.int64)
    own = indices if self_index is None else np.asarray(self_index, dtype=np.int64)
    own_t = torch.as_tensor(own, device=labels_all.device)
    if labels is None:
        if (own < 0).any():
            raise ValueError("queries outside the gallery need their labels")
        query_labels = labels_all[own_t]
    else:
        query_labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=labels_all.device)
    values: dict[str, list[Tensor]] = {}
    iterations, kept, sizes, targets = [], [], [], []
    passes = 0
    examples: dict[str, list[Tensor]] = {}
    started = time.perf_counter()
    batches = iter_batches(dataset, indices, batch_size)
    total = (len(indices) + batch_size - 1) // batch_size
    start = 0
    with frozen_eval(model):
        for images, _pos in tqdm(batches, total=total, desc=key, disable=not progress, leave=False):
            x0 = images.to(device)
            rows = slice(start, start + len(x0))
            start += len(x0)
            idx = own_t[rows].to(device)
            batch, ctx = batch_context(atk, model, x0, idx, query_labels[rows].to(device), db, generator)
            res = atk.perturb(model, x0, ctx, pgd_generator)
            passes += res.result.passes
            sizes.append((len(x0), res.result.passes))
            adv_x, adv = res.x_adv, res.emb
            with torch.no_grad():
                for name, v in atk.measure(adv, ctx).items():
                    values.setdefault(_rename(name, spec, key), []).append(v.detach().double().cpu())
            iterations.append(res.result.iterations.cpu())
            if "targets" in ctx:
                targets.append(ctx["targets"].detach().cpu())
            if keep_images:
                kept.append(adv_x.cpu())
            have = sum(len(t) for t in examples.get("clean", []))
            if have < keep_examples:
                take = min(keep_examples - have, len(x0))
                with torch.no_grad():
                    k = min(topk, len(db) - batch.self_count())
                    c_top = db.dist_masked(batch.clean_db[:take], idx[:take]).topk(k, largest=False).indices
                    a_top = db.dist_masked(adv[:take], idx[:take]).topk(k, largest=False).indices
                pos = torch.as_tensor(indices[rows][:take])
                for name, t in (("clean", x0[:take]), ("adv", adv_x[:take]), ("index", pos),
                                ("clean_topk", c_top), ("adv_topk", a_top), ("labels", batch.labels[:take])):
                    examples.setdefault(name, []).append(t.detach().cpu())
    outcome = AttackOutcome(
        key=key,
        spec=spec,
        indices=indices,
        labels=query_labels.cpu().numpy(),
        values={k: torch.cat(v).numpy() for k, v in values.items()},
        iterations=torch.cat(iterations).numpy() if iterations else np.zeros(0, dtype=np.int64),
        passes=passes,
        batch_passes=sizes,
        seconds=time.perf_counter() - started,
        adv_images=torch.cat(kept) if kept else None,
        targets=torch.cat(targets).numpy().astype(np.int64) if targets else None,
        self_index=own,
    )
    if examples:
        ex = {k: torch.cat(v) for k, v in examples.items()}
        ex["clean_topk_labels"] = labels_all.cpu()[ex["clean_topk"]]
        ex["adv_topk_labels"] = labels_all.cpu()[ex["adv_topk"]]
        gallery = dataset if gallery_dataset is None else gallery_dataset
        ex["clean_topk_images"] = _load_images(gallery, ex["clean_topk"])
        ex["adv_topk_images"] = _load_images(gallery, ex["adv_topk"])
        ex["attack"] = key
        outcome.examples = ex
    return outcome


def merge_outcomes(parts: Sequence[AttackOutcome]) -> AttackOutcome:
    """One attack's outcome over consecutive shards of its query set, as if it had run over all of them.

    Per-item arrays are concatenated in shard order, passes add up, ``seconds`` is the time summed over
    the shards (attack time, not wall time, when they ran in parallel); the examples are the first shard's.
    """
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(arrays):
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    adv = [p.adv_images for p in parts]
    return AttackOutcome(
        key=first.key, spec=first.spec, indices=np.concatenate([p.indices for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        values={name: np.concatenate([p.values[name] for p in parts]) for name in first.values},
        iterations=np.concatenate([p.iterations for p in parts]), passes=sum(p.passes for p in parts),
        batch_passes=[bp for p in parts for bp in p.batch_passes], seconds=sum(p.seconds for p in parts),
        adv_images=None if any(a is None for a in adv) else torch.cat(adv),  # type: ignore[arg-type]
        examples=first.examples, targets=cat([p.targets for p in parts]), self_index=cat([p.self_index for p in parts]),
    )


def clean_rows(model: nn.Module, x0: Tensor, self_index: Tensor, db: Database) -> Tensor:
    """The clean embeddings of a batch as the gallery has them: gallery rows, or a forward for queries outside it."""
    has = self_index >= 0
    if bool(has.all()):
        return db.emb[self_index]
    with torch.no_grad():
        fresh = model(x0)
    if not bool(has.any()):
        return fresh
    return torch.where(has.view(-1, 1), db.emb[self_index.clamp_min(0)], fresh)


def _load_images(dataset: Dataset, index: Tensor) -> Tensor:
    flat = [dataset[int(i)][0] for i in index.flatten()]  # type: ignore[index]
    return torch.stack(flat).view(*index.shape, *flat[0].shape)


def attack_queries(attack: RankingAttack, model: nn.Module, queries: Any, labels: Any = None, *, gallery: Any = None,
                   gallery_labels: Any = None, query_index: Any = None, batch_size: int = 128,
                   device: str | torch.device | None = None, seed: int = 0, normalize: bool | None = None,
                   keep_images: bool = True, progress: bool = False) -> AttackOutcome:
    """A ranking attack on a query set against the clean gallery (the attack object's ``__call__``).

    With ``gallery=None`` the queries are the gallery and each query's own row is masked, exactly as
    :func:`rdml.eval.robustness.evaluate_robustness` does on the test set. With a gallery, the queries
    have no self unless ``query_index`` maps them to gallery rows (-1 for none).
    """
    query_set = as_dataset(queries, labels, "queries")
    device = torch.device(device) if device is not None else model_device(model)
    gallery_set = None if gallery is None else as_dataset(gallery, gallery_labels, "gallery")
    model = prepare_model(model, gallery_set if gallery_set is not None else query_set, normalize, batch_size, device)
    n = len(query_set)  # type: ignore[arg-type]
    q_labels = dataset_labels(query_set)
    if gallery_set is None:
        db_emb = embed_indices(model, query_set, np.arange(n), batch_size, device)
        db = Database(db_emb.detach(), torch.as_tensor(q_labels, device=device))
        own = np.arange(n, dtype=np.int64) if query_index is None else np.asarray(query_index, dtype=np.int64)
    else:
        m = len(gallery_set)  # type: ignore[arg-type]
        db_emb = embed_indices(model, gallery_set, np.arange(m), batch_size, device)
        db = Database(db_emb.detach(), torch.as_tensor(dataset_labels(gallery_set), device=device))
        own = np.full(n, -1, dtype=np.int64) if query_index is None else np.asarray(query_index, dtype=np.int64)
    if own.shape != (n,) or (own >= len(db)).any() or (own < -1).any():
        raise ValueError(f"query_index must hold one gallery row (0..{len(db) - 1}) or -1 per query")
    return run_ranking_attack(model, query_set, np.arange(n), attack, db, key=attack.key, batch_size=batch_size,
                              device=device, seed=seed, progress=progress, keep_images=keep_images, self_index=own,
                              labels=q_labels, gallery_dataset=gallery_set)
