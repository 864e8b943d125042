"""Parquet manifests: the listing of a dataset, scanned once and reused.

Scanning SOP's 120k-line listings or walking an image folder on a network file system on every run
(and in every Ray worker) is slow; a manifest stores the result as one Parquet file with one row per
image: ``path`` (relative to the dataset's base directory; null for in-memory arrays), ``index``
(position in the source listing or array), ``label`` (contiguous within the split), ``class_id``
(original id), ``class_name`` and ``split`` (train / test, or train / query / gallery for In-Shop).

The file's schema metadata records the size and mtime of every source file (listing files, or the
class directories of an image folder) plus the parameters that shaped the split; if any of these
changed the manifest is stale and is rebuilt. Manifests are a cache: failing to write one is not an
error, the data is then simply scanned again next time. Writes go to a temp file then ``os.replace``
so concurrent readers (DDP ranks, Ray actors) never see half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_VERSION = 1


@dataclass
class Rows:
    """Column arrays of a manifest (all of equal length)."""

    path: list[str | None]
    index: np.ndarray
    class_id: np.ndarray
    class_name: list[str]
    split: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.class_id)

    def select(self, split: str) -> Rows:
        mask = self.split == split
        pos = np.flatnonzero(mask)
        return Rows(
            path=[self.path[i] for i in pos],
            index=self.index[pos],
            class_id=self.class_id[pos],
            class_name=[self.class_name[i] for i in pos],
            split=self.split[pos],
            label=self.label[pos],
        )

    def take(self, positions: np.ndarray) -> Rows:
        return Rows(
            path=[self.path[i] for i in positions],
            index=self.index[positions],
            class_id=self.class_id[positions],
            class_name=[self.class_name[i] for i in positions],
            split=self.split[positions],
            label=self.label[positions],
        )


def file_signature(paths: list[Path], base: Path | None) -> dict[str, list[int]]:
    """``{path: [mtime_ns, size]}`` of each source; paths under ``base`` are stored relative to it so
    a dataset copied elsewhere (e.g. to /dev/shm) with its manifest is still recognised."""
    sig: dict[str, list[int]] = {}
    for p in paths:
        st = os.stat(p)
        key = str(p)
        if base is not None:
            try:
                key = str(Path(p).relative_to(base))
            except ValueError:
                pass
        sig[key] = [int(st.st_mtime_ns), int(st.st_size)]
    return sig


def _meta(dataset: str, sources: dict[str, list[int]], params: dict[str, Any]) -> bytes:
    return json.dumps(
        {"version": MANIFEST_VERSION, "dataset": dataset, "sources": sources, "params": params}, sort_keys=True
    ).encode()


def read_manifest(path: Path, dataset: str, sources: dict[str, list[int]], params: dict[str, Any]) -> Rows | None:
    """The manifest's rows if it exists and matches ``sources`` and ``params``; else None (rebuild)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except Exception:  # a truncated or foreign file: rebuild it
        return None
    meta = (table.schema.metadata or {}).get(b"rdml")
    if meta != _meta(dataset, sources, params):
        return None
    cols = table.to_pydict()
    return Rows(
        path=cols["path"],
        index=np.asarray(cols["index"], dtype=np.int64),
        class_id=np.asarray(cols["class_id"], dtype=np.int64),
        class_name=cols["class_name"],
        split=np.asarray(cols["split"], dtype=object),
        label=np.asarray(cols["label"], dtype=np.int64),
    )


def write_manifest(
    path: Path, rows: Rows, dataset: str, sources: dict[str, list[int]], params: dict[str, Any]
) -> bool:
    """Write atomically; returns False (and writes nothing) if the directory is not writable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "path": pa.array(rows.path, type=pa.string()),
            "index": pa.array(rows.index, type=pa.int64()),
            "label": pa.array(rows.label, type=pa.int64()),
            "class_id": pa.array(rows.class_id, type=pa.int64()),
            "class_name": pa.array(rows.class_name, type=pa.string()),
            "split": pa.array(list(rows.split), type=pa.string()),
        }
    ).replace_schema_metadata({b"rdml": _meta(dataset, sources, params)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return False
    return True
