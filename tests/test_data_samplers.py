"""Class-balanced batch samplers and loaders: SPC-2 layout, m-per-class composition, determinism,
DDP sharding, and the train/eval loaders on real data (digits, a tiny image folder)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdml.config import DataConfig
from rdml.data import (
    MPerClassBatchSampler,
    PairBatchSampler,
    SubsetDataset,
    build_datasets,
    make_eval_loader,
    make_train_loader,
)
from rdml.errors import ConfigError, DataError


def labels_fixture(n_classes: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 9, size=n_classes)
    return rng.permutation(np.repeat(np.arange(n_classes), sizes))


def test_pairs_spc2_layout_and_every_anchor_once():
    labels = labels_fixture()
    n = len(labels)
    for batch_pairs in (1, 4, n):  # divides evenly / needs wrap-around padding / one batch
        batches = list(PairBatchSampler(labels, batch_pairs, seed=3))
        assert all(len(b) == 2 * batch_pairs for b in batches)
        flat = np.asarray(batches).reshape(-1, 2)
        anchors, partners = flat[:, 0], flat[:, 1]
        assert np.all(labels[anchors] == labels[partners]) and np.all(anchors != partners)
        counts = Counter(anchors.tolist())
        assert set(counts) == set(range(n))  # every image is an anchor
        if n % batch_pairs == 0:
            assert set(counts.values()) == {1}
        else:
            assert len(batches) == -(-n // batch_pairs) and max(counts.values()) == 2


def test_pairs_skip_single_image_classes():
    labels = np.array([0, 0, 1, 2, 2, 2])
    with pytest.warns(UserWarning, match="1 images of single-image classes"):
        s = PairBatchSampler(labels, 5)
    anchors = np.asarray(list(s)).reshape(-1, 2)[:, 0]
    assert 2 not in anchors.tolist() and set(anchors.tolist()) == {0, 1, 3, 4, 5}
    with pytest.raises(DataError, match="two or more images"):
        PairBatchSampler(np.arange(4), 2)


def test_pairs_partners_are_random_members_of_the_class():
    labels = np.repeat(np.arange(2), 50)
    partners = Counter()
    for epoch in range(20):
        for b in PairBatchSampler(labels, 10, seed=0, epoch=epoch):
            for a, p in zip(b[::2], b[1::2], strict=True):
                if a == 0:
                    partners[p] += 1
    assert len(partners) > 10 and 0 not in partners  # spread over the class, never itself


def test_m_per_class_composition():
    labels = labels_fixture(n_classes=9)
    s = MPerClassBatchSampler(labels, batch_size=12, m=3, seed=1)
    batches = list(s)
    assert len(batches) == -(-len(labels) // 12)
    for b in batches:
        blocks = np.asarray(labels[b]).reshape(4, 3)
        assert np.all(blocks == blocks[:, :1])  # m consecutive images per class
        assert len(set(blocks[:, 0].tolist())) == 4  # distinct classes in a batch
    # equal classes: classes are used equally often and each class's queue is drawn without
    # replacement, so one epoch uses every image exactly once
    even = np.random.default_rng(0).permutation(np.repeat(np.arange(6), 6))
    used = Counter(np.concatenate(list(MPerClassBatchSampler(even, batch_size=6, m=3, seed=2))).tolist())
    assert set(used) == set(range(36)) and set(used.values()) == {1}
    with pytest.raises(ConfigError, match="multiple of data.m_per_class"):
        MPerClassBatchSampler(labels, batch_size=10, m=3)
    with pytest.raises(ConfigError, match="needs 20 classes"):
        MPerClassBatchSampler(labels, batch_size=40, m=2)


@pytest.mark.parametrize("cls,kw", [(PairBatchSampler, {"batch_pairs": 3}),
                                    (MPerClassBatchSampler, {"batch_size": 6, "m": 2})])
def test_determinism_per_seed_epoch_rank(cls, kw):
    labels = labels_fixture()
    a = list(cls(labels, seed=5, epoch=2, rank=1, world_size=2, **kw))
    b = list(cls(labels, seed=5, epoch=2, rank=1, world_size=2, **kw))
    assert a == b
    assert a != list(cls(labels, seed=5, epoch=3, rank=1, world_size=2, **kw))
    assert a != list(cls(labels, seed=6, epoch=2, rank=1, world_size=2, **kw))
    s = cls(labels, seed=5, epoch=0, **kw)
    s.set_epoch(2)
    assert list(s) == list(cls(labels, seed=5, epoch=2, **kw))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_sharding(world_size):
    labels = labels_fixture(n_classes=11)
    full = [tuple(b) for b in PairBatchSampler(labels, 4, seed=9, epoch=1)]
    shards = [[tuple(b) for b in PairBatchSampler(labels, 4, seed=9, epoch=1, rank=r, world_size=world_size)]
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    assert len(shards[0]) == -(-len(full) // world_size)
    # ranks get distinct batches that together are the single-process epoch (plus wrap-around padding)
    merged = [b for s in shards for b in s]
    assert set(merged) == set(full)
    padding = len(merged) - len(full)
    assert padding == (-len(full)) % world_size
    assert len(merged) - len(set(merged)) == padding  # only the padding repeats batches


def test_ddp_sharding_without_padding_is_disjoint():
    labels = np.repeat(np.arange(6), 4)  # 24 anchors, 2 pairs per batch: 12 batches over 3 ranks
    shards = [{tuple(b) for b in PairBatchSampler(labels, 2, seed=1, rank=r, world_size=3)} for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    anchors = [b[0] for s in shards for b in s] + [b[2] for s in shards for b in s]
    assert sorted(anchors) == list(range(24))  # every image an anchor exactly once across ranks


def test_train_loader_digits_pairs(tmp_path):
    cfg = DataConfig(name="digits", batch_pairs=8, manifest_dir=tmp_path)
    train = build_datasets(cfg).train
    loader = make_train_loader(train, cfg, seed=0, epoch=0)
    assert len(loader) == -(-len(train) // 8)
    x, y, idx = next(iter(loader))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,) and idx.shape == (16,)
    assert torch.equal(y[0::2], y[1::2])  # SPC-2: each anchor followed by a same-class partner
    assert torch.equal(y, torch.as_tensor(train.labels[idx.numpy()]))
    x2, y2, idx2 = next(iter(make_train_loader(train, cfg, seed=0, epoch=0)))
    assert torch.equal(idx, idx2) and torch.equal(x, x2)
    assert not torch.equal(idx, next(iter(make_train_loader(train, cfg, seed=0, epoch=1)))[2])
    # m_per_class through the same entry point; a SubsetDataset (EAT data part) keeps global ids
    part = SubsetDataset(train, np.flatnonzero(train.labels < 3))
    mcfg = DataConfig(name="digits", batch_pairs=6, batch_sampler="m_per_class", m_per_class=4)
    _, y, idx = next(iter(make_train_loader(part, mcfg, seed=0)))
    assert y.shape == (12,) and set(y.tolist()) <= {0, 1, 2}
    assert torch.equal(y.view(3, 4), y.view(3, 4)[:, :1].expand(3, 4))
    assert torch.equal(y, torch.as_tensor(train.labels[idx.numpy()]))  # indices are global


def test_eval_loader_is_sequential(tmp_path):
    cfg = DataConfig(name="digits", eval_batch_size=100, manifest_dir=tmp_path, limit_test=250)
    test = build_datasets(cfg).test
    batches = list(make_eval_loader(test, cfg))
    assert [len(b[2]) for b in batches] == [100, 100, 50]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(250))


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c", "d"):
        for j in range(4):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    return root


def test_augmented_batches_are_reproducible(tmp_path):
    cfg = DataConfig(name="folder", root=_folder(tmp_path / "imgs"), image_size=24, batch_pairs=4)
    train = build_datasets(cfg).train
    assert train.augments
    runs = [next(iter(make_train_loader(train, cfg, seed=1, epoch=0))) for _ in range(2)]
    torch.manual_seed(123)  # the global RNG state must not matter
    runs.append(next(iter(make_train_loader(train, cfg, seed=1, epoch=0))))
    assert runs[0][0].shape == (8, 3, 24, 24)
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][2], r[2]) for r in runs[1:])
    # each sample's augmentation is seeded by the loader: same seed, same crop; other seeds differ
    from rdml.data.loaders import _SeededView

    view = _SeededView(train)
    assert torch.equal(view[(0, 5)][0], view[(0, 5)][0])
    assert any(not torch.equal(view[(0, 5)][0], view[(0, s)][0]) for s in range(6, 12))
