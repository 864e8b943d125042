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

The data-set check (:mod:`rdml.data.check`) caches its verdicts in the same file: two extra columns,
``checked_mtime_ns`` and ``checked_size``, hold the mtime and size each image file had when it last
passed the check (null: not checked, or it failed). A file whose mtime and size still match is not
opened again; a rebuilt (stale) manifest starts without them, so everything is checked again.
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
CHECK_COLUMNS = ("checked_mtime_ns", "checked_size")


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
    return _write_table(table, path)


def read_checked(path: Path | None) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime_ns, size)}`` of the files that passed the data-set check (cached)."""
    import pyarrow.parquet as pq

    if path is None or not Path(path).is_file():
        return {}
    try:
        table = pq.read_table(path, columns=["path", *CHECK_COLUMNS])
    except Exception:  # an older manifest without the columns, or a foreign file: nothing cached
        return {}
    cols = table.to_pydict()
    return {p: (int(m), int(z)) for p, m, z in zip(cols["path"], cols[CHECK_COLUMNS[0]], cols[CHECK_COLUMNS[1]],
                                                    strict=True)
            if p is not None and m is not None and z is not None}


def write_checked(path: Path, checked: dict[str, tuple[int, int]]) -> bool:
    """Store the check verdicts in the manifest at ``path`` (atomically; False if it cannot be written).

    The rows and the schema metadata stay as they are, so the manifest stays valid for its sources.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception:  # noqa: BLE001 - gone or unreadable: it is a cache
        return False
    meta = table.schema.metadata
    for name in CHECK_COLUMNS:
        if name in table.column_names:
            table = table.drop_columns([name])
    paths = table.column("path").to_pylist()
    sig = [checked.get(p) if p is not None else None for p in paths]
    table = table.append_column(CHECK_COLUMNS[0], pa.array([s[0] if s else None for s in sig], type=pa.int64()))
    table = table.append_column(CHECK_COLUMNS[1], pa.array([s[1] if s else None for s in sig], type=pa.int64()))
    table = table.replace_schema_metadata(meta)
    return _write_table(table, path)


def _write_table(table: Any, path: Path) -> bool:
    """Write ``table`` to ``path`` atomically (temp file + rename); False when the cache is not writable."""
    import pyarrow.parquet as pq

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
