"""Run one ranking attack over a set of test samples, batch by batch, through the one PGD engine.

The runner loads the attacked images in batches (never the whole test set at once), builds the
attack's targets from the benign database, hands ``embed -> attack.loss`` to :func:`pgd` and keeps the
per-sample outcomes. The embedding of the final adversarial batch is taken from the engine's own last
evaluation of the objective, so measuring costs no extra forward pass.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from rdml.attacks.pgd import frozen_eval, pgd
from rdml.attacks.profiles import AttackSpec
from rdml.attacks.ranking import Batch, Database, build_ranking_attack


def attack_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one attack's target sampling, stable per (eval seed, attack key)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset following the rdml protocol (``.labels``), else read item by item."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


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
    """Per-sample results of one attack over the attacked samples."""

    key: str
    spec: AttackSpec
    indices: np.ndarray  # database positions of the attacked samples
    labels: np.ndarray
    values: dict[str, np.ndarray]  # metric name (prefixed with the key) -> per-sample value
    iterations: np.ndarray  # PGD steps taken per sample
    passes: int  # forward+backward passes made by the engine
    batch_passes: list[tuple[int, int]] = field(default_factory=list)  # (batch size, engine passes) per batch
    seconds: float = 0.0
    adv_images: Tensor | None = None  # all adversarial images (CPU) when asked for
    examples: dict | None = None  # a few clean/adversarial images with their top-k retrievals

    def summary(self) -> dict[str, float]:
        """Mean of each per-sample metric (the reported number)."""
        return {name: float(v.mean()) if len(v) else float("nan") for name, v in self.values.items()}


def _rename(metric: str, spec: AttackSpec, key: str) -> str:
    return key + metric[len(spec.base_name) :] if metric.startswith(spec.base_name) else f"{key}:{metric}"


def run_ranking_attack(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    spec: AttackSpec,
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
) -> AttackOutcome:
    """Attack every sample in ``dataset[indices]`` with ``spec`` against the benign ``db``."""
    key = key or spec.base_name
    attack = build_ranking_attack(spec, db)
    generator = attack_generator(seed, key)
    pgd_generator = attack_generator(seed + 1, key)
    labels_all = db.labels
    values: dict[str, list[Tensor]] = {}
    iterations, kept, sizes = [], [], []
    passes = 0
    examples: dict[str, list[Tensor]] = {}
    started = time.perf_counter()
    batches = iter_batches(dataset, indices, batch_size)
    total = (len(indices) + batch_size - 1) // batch_size
    with frozen_eval(model):
        for images, pos in tqdm(batches, total=total, desc=key, disable=not progress, leave=False):
            x0 = images.to(device)
            idx = pos.to(device)
            clean_db = db.emb[idx]
            if spec.kind == "ES":
                with torch.no_grad():
                    clean = model(x0)
            else:
                clean = clean_db
            batch = Batch(idx=idx, labels=labels_all[idx], clean=clean, clean_db=clean_db)
            ctx = attack.setup(batch, generator)
            active = attack.active(ctx)
            stash: dict[str, Tensor] = {}

            def objective(x: Tensor, ctx=ctx, stash=stash) -> Tensor:
                emb = model(x)
                stash["emb"] = emb.detach()
                return attack.loss(emb, ctx)

            done = None if active is None else (lambda x, losses, active=active: ~active)
            res = pgd(objective, x0, spec.budget, done=done, generator=pgd_generator)
            passes += res.passes
            sizes.append((len(x0), res.passes))
            if spec.restarts > 1 or "emb" not in stash:
                with torch.no_grad():
                    stash["emb"] = model(res.x_adv)
            adv_x, adv = res.x_adv, stash["emb"]
            if active is not None:
                adv_x = torch.where(active.view(-1, *([1] * (x0.dim() - 1))), adv_x, x0)
                adv = torch.where(active.view(-1, 1), adv, clean)
            with torch.no_grad():
                for name, v in attack.measure(adv, ctx).items():
                    values.setdefault(_rename(name, spec, key), []).append(v.detach().double().cpu())
            iterations.append(res.iterations.cpu())
            if keep_images:
                kept.append(adv_x.cpu())
            have = sum(len(t) for t in examples.get("clean", []))
            if have < keep_examples:
                take = min(keep_examples - have, len(x0))
                with torch.no_grad():
                    k = min(topk, len(db) - 1)
                    c_top = db.dist_masked(clean_db[:take], idx[:take]).topk(k, largest=False).indices
                    a_top = db.dist_masked(adv[:take], idx[:take]).topk(k, largest=False).indices
                for name, t in (("clean", x0[:take]), ("adv", adv_x[:take]), ("index", idx[:take]),
                                ("clean_topk", c_top), ("adv_topk", a_top)):
                    examples.setdefault(name, []).append(t.detach().cpu())
    outcome = AttackOutcome(
        key=key,
        spec=spec,
        indices=np.asarray(indices, dtype=np.int64),
        labels=labels_all.cpu().numpy()[np.asarray(indices, dtype=np.int64)],
        values={k: torch.cat(v).numpy() for k, v in values.items()},
        iterations=torch.cat(iterations).numpy() if iterations else np.zeros(0, dtype=np.int64),
        passes=passes,
        batch_passes=sizes,
        seconds=time.perf_counter() - started,
        adv_images=torch.cat(kept) if kept else None,
    )
    if examples:
        ex = {k: torch.cat(v) for k, v in examples.items()}
        ex["labels"] = labels_all.cpu()[ex["index"]]
        ex["clean_topk_labels"] = labels_all.cpu()[ex["clean_topk"]]
        ex["adv_topk_labels"] = labels_all.cpu()[ex["adv_topk"]]
        ex["clean_topk_images"] = _load_images(dataset, ex["clean_topk"])
        ex["adv_topk_images"] = _load_images(dataset, ex["adv_topk"])
        ex["attack"] = key
        outcome.examples = ex
    return outcome


def _load_images(dataset: Dataset, index: Tensor) -> Tensor:
    flat = [dataset[int(i)][0] for i in index.flatten()]  # type: ignore[index]
    return torch.stack(flat).view(*index.shape, *flat[0].shape)
