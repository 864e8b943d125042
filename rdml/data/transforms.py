"""Image transforms of the DML protocol for the 224x224 datasets.

Train: Resize to (256, 256) ignoring aspect ratio, RandomCrop 224, RandomHorizontalFlip; test:
Resize (256, 256), CenterCrop 224. Both end in float [0,1] tensors with NO mean/std normalisation:
models normalise inside ``forward`` so attacks work in [0,1] pixel space. A smaller
``data.image_size`` scales the resize by the same 256/224 ratio (tests use 32 to stay fast).
The 28x28 datasets use raw pixels without any transform (see :class:`rdml.data.base.ArrayDataset`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rdml._torchvision_compat import import_torchvision


def resize_size(image_size: int) -> int:
    """The pre-crop square size: 256 for 224, the same ratio otherwise."""
    return 256 if image_size == 224 else int(round(image_size * 256 / 224))


def build_transform(image_size: int, train: bool) -> Callable:
    """The PIL-image -> FloatTensor[3, image_size, image_size] pipeline (torchvision.transforms.v2)."""
    import_torchvision()
    from torchvision.transforms import v2

    size = resize_size(image_size)
    crop = [v2.RandomCrop(image_size), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(image_size)]
    return v2.Compose(
        [v2.Resize((size, size), antialias=True), *crop, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    )
