"""The dataset protocol every split follows, and its three implementations.

Every split is a ``torch.utils.data.Dataset`` returning ``(image FloatTensor[C,H,W] in [0,1], label,
index)`` and carrying ``.labels`` (contiguous 0..K-1 within the split), ``.class_ids`` (the original
class id of each sample, so reports can name real classes), ``.num_classes``, ``.in_channels``,
``.image_size`` and ``.name``. Returning the index lets training attach per-sample statistics (EAT's
robustness statistics) to global sample ids without a second lookup.

* :class:`ArrayDataset`: small in-memory image arrays (digits, MNIST, Fashion-MNIST);
* :class:`ImageFileDataset`: image files decoded with PIL on access (CUB, Cars, SOP, In-Shop, folder);
* :class:`SubsetDataset`: a view on a parent that keeps labels and global indices (EAT data parts,
  small evaluation subsets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rdml.errors import DataError


def remap_labels(class_ids: np.ndarray, classes: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Contiguous labels 0..K-1 in increasing order of the original class ids.

    ``classes`` fixes the mapping (e.g. In-Shop query and gallery share the test split's mapping);
    by default it is the sorted set of ``class_ids``.
    """
    class_ids = np.asarray(class_ids, dtype=np.int64)
    table = np.unique(class_ids) if classes is None else np.asarray(classes, dtype=np.int64)
    labels = np.searchsorted(table, class_ids)
    if len(class_ids) and (labels.max() >= len(table) or np.any(table[labels] != class_ids)):
        raise ValueError("class ids outside the given class table")
    return labels.astype(np.int64)


class RdmlDataset(Dataset):
    """Common attributes of a split. Subclasses implement ``_load(i) -> FloatTensor[C,H,W]``."""

    #: True when ``__getitem__`` draws random numbers (train-time augmentation); the train loader then
    #: seeds each sample so that batches are reproducible for a given (seed, epoch, rank).
    augments: bool = False

    def __init__(
        self,
        name: str,
        split: str,
        labels: np.ndarray,
        class_ids: np.ndarray,
        in_channels: int,
        image_size: int,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = int(num_classes if num_classes is not None else len(np.unique(self.labels)))
        #: name of each original class id (folder: directory names), when the dataset has names
        self.class_names = (
            dict(zip(self.class_ids.tolist(), class_names, strict=True)) if class_names is not None else None
        )

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        if i < 0 or i >= len(self):
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} of size {len(self)}")
        return self._load(i), int(self.labels[i]), i

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, shape=({self.in_channels},{self.image_size},{self.image_size}))"
        )


class ArrayDataset(RdmlDataset):
    """Images held in memory: ``uint8 [N,H,W]`` (0..255) or ``float [N,H,W]`` already in [0,1].

    The 28x28 protocol uses raw pixels and no augmentation; if ``image_size`` differs from the stored
    size the image is resized bilinearly on access (digits are resized once up front instead).
    """

    def __init__(self, images: np.ndarray | torch.Tensor, **kwargs) -> None:
        super().__init__(in_channels=1, **kwargs)
        self.images = torch.as_tensor(images)
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def _load(self, i: int) -> torch.Tensor:
        x = self.images[i]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = x.unsqueeze(0) if x.dim() == 2 else x
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(
                x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )[0].clamp_(0.0, 1.0)
        return x


class ImageFileDataset(RdmlDataset):
    """Image files decoded with PIL (``torchvision.io`` is unavailable with CPU torch), as RGB.

    A file that cannot be opened or decoded raises :class:`DataError` naming the file, so a single
    corrupt JPEG in 100k is found without a debugger.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Callable, train: bool, **kwargs) -> None:
        super().__init__(in_channels=3, **kwargs)
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.augments = train
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise DataError(
                f"dataset {self.name!r}: cannot read image {path}: {type(exc).__name__}: {exc}. "
                "Re-extract the dataset (or remove the file and its listing entry, then delete the "
                "rdml-*.manifest.parquet next to it so the manifest is rebuilt)."
            ) from None
        return self.transform(img)


class SubsetDataset(Dataset):
    """A view on ``dataset`` restricted to ``indices``; labels are preserved (not remapped).

    The returned ``index`` is whatever the parent returns, i.e. the position in the root dataset, so
    sample ids stay global through nested subsets (EAT parts of a limited split, ...).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError("indices must be one-dimensional")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise IndexError(f"subset indices out of range for a dataset of size {len(dataset)}")
        self.labels = np.asarray(dataset.labels)[self.indices]
        self.class_ids = np.asarray(dataset.class_ids)[self.indices]
        self.num_classes = dataset.num_classes
        self.in_channels = dataset.in_channels
        self.image_size = dataset.image_size
        self.name = dataset.name
        self.split = getattr(dataset, "split", "")
        self.class_names = getattr(dataset, "class_names", None)
        self.augments = getattr(dataset, "augments", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.dataset[int(self.indices[i])]

    def __repr__(self) -> str:
        return f"SubsetDataset({self.dataset!r}, n={len(self)})"


@dataclass
class DatasetSplits:
    """The splits of one dataset. ``test`` is always the full zero-shot test set; In-Shop also has
    ``query`` and ``gallery`` (subsets of ``test`` with the test split's labels), else None."""

    train: RdmlDataset
    test: RdmlDataset
    query: SubsetDataset | None = None
    gallery: SubsetDataset | None = None
    #: the Parquet manifest the splits were read from (None: could not be written anywhere)
    manifest_path: Path | None = None
    #: True when an existing, up-to-date manifest was read instead of re-scanning the listing files
    manifest_reused: bool = False
