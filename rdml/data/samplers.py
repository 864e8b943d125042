"""Class-balanced batch samplers for metric learning, deterministic and DDP-aware.

* :class:`PairBatchSampler` (SPC-2, the RobRank protocol): each batch is ``[a1, p1, a2, p2, ...]``
  with ``p_i`` a random *other* image of ``a_i``'s class. Every image (of a class with at least two
  images) is an anchor once per epoch, so an epoch means what it says.
* :class:`MPerClassBatchSampler`: ``batch_size / m`` distinct classes per batch, ``m`` images each,
  laid out class by class (with m=2 this is the SPC-2 layout too).

Both are deterministic functions of ``(seed, epoch, rank)``. The global list of batches depends only
on ``(seed, epoch)``; rank ``r`` of ``world_size`` takes batches ``r, r + W, ...``, so ranks see
distinct batches, and the list is padded (by wrapping around) to a multiple of ``world_size`` so all
ranks run the same number of steps and DDP's all-reduce never waits on a finished rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from rdml.errors import ConfigError, DataError


def _class_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, counts)``: sample ids sorted by class, each class's offset and size."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return order, starts, counts


class _ShardedBatches(Sampler[list[int]]):
    """Shared bookkeeping: epoch-seeded generation of the global batch list, then rank sharding."""

    def __init__(self, labels: np.ndarray, seed: int, epoch: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.epoch, self.rank, self.world_size = int(seed), int(epoch), int(rank), int(world_size)
        self._batches: list[np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Move to another epoch (new shuffle), like ``DistributedSampler.set_epoch``."""
        self.epoch = int(epoch)
        self._batches = None

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 0x5EED])

    def _global_batches(self) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mine(self) -> list[np.ndarray]:
        if self._batches is None:
            batches = self._global_batches()
            if batches and len(batches) % self.world_size:
                pad = self.world_size - len(batches) % self.world_size
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
            self._batches = batches[self.rank :: self.world_size]
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._mine():
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._mine())


class PairBatchSampler(_ShardedBatches):
    """SPC-2 batches of ``batch_pairs`` (anchor, positive) pairs: ``2 * batch_pairs`` indices each.

    All eligible anchors are shuffled; the last incomplete batch is filled by wrapping around to the
    start of the shuffle (so every batch has the full size that miners expect, and every anchor still
    appears at least once per epoch, at most twice). Images of single-image classes cannot form a
    pair and are skipped as anchors (with a warning).
    """

    def __init__(self, labels: np.ndarray, batch_pairs: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(labels, seed, epoch, rank, world_size)
        if batch_pairs < 1:
            raise ValueError("batch_pairs must be positive")
        self.batch_pairs = int(batch_pairs)
        self.order, starts, counts = _class_index(self.labels)
        # per sample: its class's start offset in `order`, class size, and its own position there
        n = len(self.labels)
        cls_of_pos = np.repeat(np.arange(len(counts)), counts)
        self._start = np.empty(n, np.int64)
        self._count = np.empty(n, np.int64)
        self._pos = np.empty(n, np.int64)
        self._start[self.order] = starts[cls_of_pos]
        self._count[self.order] = counts[cls_of_pos]
        self._pos[self.order] = np.arange(n) - starts[cls_of_pos]
        self.anchors = np.flatnonzero(self._count >= 2)
        if len(self.anchors) == 0:
            raise DataError("no class has two or more images: SPC-2 pair batches cannot be formed")
        if len(self.anchors) < n:
            warnings.warn(f"{n - len(self.anchors)} images of single-image classes are not used as anchors",
                          stacklevel=2)

    def _global_batches(self) -> list[np.ndarray]:
        rng = self._rng()
        anchors = rng.permutation(self.anchors)
        # partner: a uniformly random *other* member of the class (offset 1..count-1, cyclic)
        offset = rng.integers(1, self._count[anchors])
        partners = self.order[self._start[anchors] + (self._pos[anchors] + offset) % self._count[anchors]]
        per = self.batch_pairs
        nb = math.ceil(len(anchors) / per)
        total = nb * per
        idx = np.arange(total) % len(anchors)
        pairs = np.stack([anchors[idx], partners[idx]], axis=1).reshape(nb, 2 * per)
        return list(pairs)


class MPerClassBatchSampler(_ShardedBatches):
    """Batches of ``batch_size // m`` distinct classes with ``m`` images each, class by class.

    Images of a class are drawn from its own reshuffled queue (without replacement until the class is
    exhausted; classes with fewer than ``m`` images repeat some). The epoch has
    ``ceil(len(dataset) / batch_size)`` batches in total over all ranks.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, m: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(labels, seed, epoch, rank, world_size)
        if m < 1 or batch_size % m:
            raise ConfigError(f"batch size {batch_size} must be a multiple of data.m_per_class={m}")
        self.batch_size, self.m = int(batch_size), int(m)
        self.order, self.starts, self.counts = _class_index(self.labels)
        self.classes_per_batch = batch_size // m
        if self.classes_per_batch > len(self.counts):
            raise ConfigError(
                f"a batch of {batch_size} images with data.m_per_class={m} needs {self.classes_per_batch} "
                f"classes but the split has {len(self.counts)}; lower data.batch_pairs or raise m_per_class"
            )

    def _global_batches(self) -> list[np.ndarray]:
        rng = self._rng()
        n_classes = len(self.counts)
        queues = [rng.permutation(self.order[s : s + c]) for s, c in zip(self.starts, self.counts, strict=True)]
        heads = np.zeros(n_classes, np.int64)
        nb = math.ceil(len(self.labels) / self.batch_size)
        # class order: concatenated permutations, so all classes are used about equally often
        batches = []
        class_perm = rng.permutation(n_classes)
        cursor = 0
        for _ in range(nb):
            chosen = []
            while len(chosen) < self.classes_per_batch:
                if cursor == n_classes:
                    class_perm, cursor = rng.permutation(n_classes), 0
                c = int(class_perm[cursor])
                cursor += 1
                if c not in chosen:
                    chosen.append(c)
            batch = []
            for c in chosen:
                q = queues[c]
                take = []
                for _ in range(self.m):
                    if heads[c] == len(q):
                        q = queues[c] = rng.permutation(q)
                        heads[c] = 0
                    take.append(q[heads[c]])
                    heads[c] += 1
                batch.extend(take)
            batches.append(np.asarray(batch, dtype=np.int64))
        return batches
