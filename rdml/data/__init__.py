"""Datasets for rdml: registry, zero-shot splits, class-balanced samplers, transforms, manifests.

Public API::

    splits = build_datasets(cfg.data)          # .train, .test (+ .query/.gallery for In-Shop)
    loader = make_train_loader(splits.train, cfg.data, seed, epoch, rank, world_size)
    for images, labels, indices in loader: ...  # SPC-2: [x1a, x1b, x2a, x2b, ...]
    make_eval_loader(splits.test, cfg.data)
    SubsetDataset(splits.train, indices)       # labels and global indices preserved
    dataset_status(cfg.data)                   # what `rdml datasets` prints
"""

from rdml.data.base import (
    ArrayDataset,
    DatasetSplits,
    ImageFileDataset,
    RdmlDataset,
    SubsetDataset,
    remap_labels,
)
from rdml.data.loaders import make_batch_sampler, make_eval_loader, make_train_loader
from rdml.data.registry import (
    DATASET_NAMES,
    DatasetStatus,
    build_datasets,
    dataset_status,
    default_root,
    get_reader,
    resolve_root,
)
from rdml.data.samplers import MPerClassBatchSampler, PairBatchSampler

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "DatasetSplits",
    "DatasetStatus",
    "ImageFileDataset",
    "MPerClassBatchSampler",
    "PairBatchSampler",
    "RdmlDataset",
    "SubsetDataset",
    "build_datasets",
    "dataset_status",
    "default_root",
    "get_reader",
    "make_batch_sampler",
    "make_eval_loader",
    "make_train_loader",
    "remap_labels",
    "resolve_root",
]
