"""DataLoaders for training (class-balanced batches) and evaluation (sequential).

Training batches are reproducible for a given ``(seed, epoch, rank)``: the batch sampler is
deterministic, and when the dataset augments (random crops/flips) each sample's augmentation is
seeded from ``(seed, epoch, rank, batch, position)``, independent of worker count and of the global
torch RNG state. That is also what lets a stopped epoch resume exactly: ``skip=k`` drops the first
``k`` batches of the epoch at the sampler (no image is loaded for them), and the batches after them
are the same, with the same augmentation seeds, as in an uninterrupted epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rdml.config import DataConfig
from rdml.data.samplers import MPerClassBatchSampler, PairBatchSampler
from rdml.errors import DataError


class _Loader(DataLoader):
    """A DataLoader whose worker-side :class:`DataError` surfaces with its own message only.

    PyTorch re-raises a worker exception as the same type with the worker's traceback as message;
    users should see "cannot read image <path>", not a traceback (the CLI prints RdmlErrors bare).
    """

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as err:
                msg = str(err)
                if "Original Traceback" in msg:
                    raise DataError(msg.rsplit("DataError: ", 1)[-1].strip()) from None
                raise
            yield batch


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler so that each index travels with its own augmentation seed."""

    def __init__(self, inner: Sampler[list[int]], seed: int, epoch: int, rank: int) -> None:
        self.inner = inner
        self.key = (int(seed), int(epoch), int(rank))

    def __iter__(self):
        for b, batch in enumerate(self.inner):
            seeds = np.random.default_rng([*self.key, b]).integers(0, 2**62, size=len(batch))
            yield [(i, int(s)) for i, s in zip(batch, seeds, strict=True)]

    def __len__(self) -> int:
        return len(self.inner)


class _SkipBatches(Sampler[list]):
    """The batches of ``inner`` after the first ``skip`` (indices only: nothing is loaded for them)."""

    def __init__(self, inner: Sampler[list], skip: int) -> None:
        self.inner = inner
        self.skip = max(0, int(skip))

    def __iter__(self):
        for b, batch in enumerate(self.inner):
            if b >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


class _SeededView(Dataset):
    """``dataset[(i, seed)]``: the sample drawn with the torch CPU RNG seeded to ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


def make_batch_sampler(dataset: Dataset, cfg: DataConfig, seed: int, epoch: int = 0, rank: int = 0,
                       world_size: int = 1) -> PairBatchSampler | MPerClassBatchSampler:
    """The configured class-balanced batch sampler over ``dataset.labels``."""
    labels = np.asarray(dataset.labels)
    if cfg.batch_sampler == "pairs":
        return PairBatchSampler(labels, cfg.batch_pairs, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    return MPerClassBatchSampler(labels, 2 * cfg.batch_pairs, cfg.m_per_class, seed=seed, epoch=epoch, rank=rank,
                                 world_size=world_size)


def make_train_loader(dataset: Dataset, cfg: DataConfig, seed: int, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, skip: int = 0) -> DataLoader:
    """Batches ``(images[2B,C,H,W], labels[2B], indices[2B])`` with ``B = cfg.batch_pairs``.

    ``batch_sampler="pairs"``: SPC-2 layout ``[x1a, x1b, x2a, x2b, ...]``; ``"m_per_class"``: blocks
    of ``m_per_class`` same-class images. ``rank``/``world_size`` shard an epoch's batches over DDP
    ranks (distinct batches, equal counts). ``skip``: start after this rank's first ``skip`` batches
    (resuming a stopped epoch); ``len()`` is then the number of batches left.
    """
    sampler: Sampler = make_batch_sampler(dataset, cfg, seed, epoch, rank, world_size)
    source = dataset
    if getattr(dataset, "augments", False):
        sampler, source = _SeededBatches(sampler, seed, epoch, rank), _SeededView(dataset)
    if skip:
        sampler = _SkipBatches(sampler, skip)  # after seeding: batch b keeps batch b's augmentation seeds
    return _Loader(source, batch_sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=torch.cuda.is_available())


def make_eval_loader(dataset: Dataset, cfg: DataConfig) -> DataLoader:
    """Sequential batches of ``cfg.eval_batch_size`` (no shuffle, no augmentation)."""
    return _Loader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
