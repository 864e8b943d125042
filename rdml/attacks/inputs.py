"""What a user hands the public API, made uniform: images and labels as datasets, any embedding model.

rdml's data protocol is a dataset yielding ``(image, label, index)`` with images in [0, 1] and a
``labels`` array; the attack and evaluation code reads nothing else. The public API
(attack objects, :func:`rdml.evaluate`) also takes plain tensors, so :func:`as_dataset` wraps
``(images, labels)`` into that protocol, and :func:`prepare_model` checks that a model maps images to
``[n, D]`` embeddings and decides whether they must be L2-normalised (rdml's metric is the Euclidean
distance on the unit sphere: ES:D lies in [0, 2], TMA is a cosine, ERS assumes both).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from rdml.errors import DataError

NORM_TOLERANCE = 1e-3
"""An embedding counts as L2-normalised when every row's norm is within this of 1."""


class TensorImages(Dataset):
    """Images ``[n, C, H, W]`` in [0, 1] and labels ``[n]`` as an rdml dataset (``(image, label, index)``)."""

    def __init__(self, images: Tensor, labels: Any) -> None:
        self.images = images
        self.labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(images):
            raise DataError(f"{len(images)} images but {len(self.labels)} labels: pass one label per image")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i


def as_dataset(data: Any, labels: Any = None, what: str = "queries") -> Dataset:
    """A dataset in rdml's protocol from a dataset, an ``(images, labels)`` pair, or images with ``labels``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and labels is None:
        data, labels = data
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, Tensor):
        if labels is None:
            raise DataError(f"{what}: images given without labels; pass the labels too (one integer class per image)")
        if data.dim() != 4 or not data.is_floating_point():
            raise DataError(f"{what}: expected float images [n, C, H, W], got {tuple(data.shape)} {data.dtype}")
        if len(data) and (float(data.min()) < 0 or float(data.max()) > 1):
            raise DataError(f"{what}: pixel values lie in [{float(data.min()):.3g}, {float(data.max()):.3g}]; attacks "
                            "work in [0, 1] pixel space: pass unnormalised images and normalise inside the model")
        return TensorImages(data.detach(), labels)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if labels is not None:
            raise DataError(f"{what}: a dataset carries its own labels; pass labels only with image tensors")
        return data  # type: ignore[return-value]
    raise DataError(f"{what}: expected an image tensor [n, C, H, W] with labels, an (images, labels) pair or a "
                    f"dataset yielding (image, label, ...), got {type(data).__name__}")


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset following the rdml protocol (``.labels``), else read item by item."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


class L2Normalized(nn.Module):
    """``F.normalize(model(x))``: puts any embedding model's output on the unit sphere rdml measures on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.model(x), dim=1)


@torch.no_grad()
def probe(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> Tensor:
    """The embeddings of the first batch of ``dataset``; refuses a model that does not return ``[n, D]``."""
    n = min(len(dataset), max(2, batch_size))  # type: ignore[arg-type]
    images = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"the model maps {n} images to {shape}; an embedding model must return one vector per image, "
                        "[n, D]: wrap it, e.g. nn.Sequential(model, nn.Flatten())")
    return out


def prepare_model(model: nn.Module, dataset: Dataset, normalize: bool | None, batch_size: int,
                  device: torch.device) -> nn.Module:
    """The model on ``device``, checked, and wrapped in :class:`L2Normalized` when asked or needed.

    ``normalize=None`` wraps only when the first batch's embeddings are not unit vectors (rdml's own
    models normalise inside ``forward`` and are left untouched); True always wraps, False never.
    """
    model = model.to(device)
    if normalize is False or isinstance(model, L2Normalized):
        return model
    if normalize:
        return L2Normalized(model)
    emb = probe(model, dataset, batch_size, device)
    if (emb.norm(dim=1) - 1).abs().max() > NORM_TOLERANCE:
        return L2Normalized(model)
    return model
