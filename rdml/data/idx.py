"""Reader for the IDX format of MNIST and Fashion-MNIST (gzipped or not).

torchvision's MNIST class wants its own folder layout and tries to download; the four IDX files are
all we need, and reading them is a header plus one ``np.frombuffer``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from rdml.errors import DataError

_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d (N, rows, cols); dtype byte 0x08 = uint8


def read_idx(path: Path, dataset: str) -> np.ndarray:
    """The array stored in an IDX file (``uint8``). Malformed files raise :class:`DataError`."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4:
                raise ValueError("file shorter than its 4-byte magic number")
            magic = struct.unpack(">I", header)[0]
            if magic not in _MAGIC:
                raise ValueError(f"magic number {magic} is not 2049 (labels) or 2051 (images)")
            ndim = _MAGIC[magic]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = f.read()
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise DataError(
            f"dataset {dataset!r}: {path} is not a valid IDX file ({exc}); re-download it (the file may be "
            "truncated, or an HTML error page saved under that name)"
        ) from None
    expected = int(np.prod(dims))
    if len(data) != expected:
        raise DataError(
            f"dataset {dataset!r}: {path} holds {len(data)} bytes of data but its header says {dims} "
            f"({expected} bytes); re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)
