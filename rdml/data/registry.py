"""The dataset registry: resolve a dataset's root, read (or build) its manifest, make its splits.

``build_datasets(cfg)`` is the single entry point used by training, evaluation and the ensemble;
``dataset_status`` reports what is present where (the ``rdml datasets`` command).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdml.config import DataConfig
from rdml.data.base import DatasetSplits, SubsetDataset
from rdml.data.manifest import Rows, file_signature, read_manifest, write_manifest
from rdml.data.readers import READERS, Located, Reader
from rdml.errors import DataError

DATASET_NAMES: tuple[str, ...] = tuple(READERS)


def get_reader(name: str) -> Reader:
    try:
        return READERS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(READERS)}") from None


def cache_dir() -> Path:
    """Where caches go when the dataset has no writable directory of its own (digits, read-only roots)."""
    return Path.home() / ".rdml" / "cache"


def default_root(name: str) -> Path:
    """``$RDML_DATA/<name>`` if RDML_DATA is set, else ``~/.rdml/data/<name>``."""
    base = os.environ.get("RDML_DATA")
    return (Path(base) if base else Path.home() / ".rdml" / "data") / name


def resolve_root(cfg: DataConfig) -> Path | None:
    """The directory the dataset is read from (None for the embedded digits)."""
    if get_reader(cfg.name).embedded:
        return None
    return Path(cfg.root).expanduser() if cfg.root is not None else default_root(cfg.name)


def _manifest_candidates(reader: Reader, cfg: DataConfig, loc: Located) -> list[Path]:
    """Where the manifest is looked for / written, in order of preference."""
    key = hashlib.sha1(str(loc.root.resolve() if loc.root else "embedded").encode()).hexdigest()[:12]
    fallback = cache_dir() / "manifests" / f"rdml-{reader.name}-{key}.manifest.parquet"
    if cfg.manifest_dir is not None:
        return [Path(cfg.manifest_dir).expanduser() / f"rdml-{reader.name}-{key}.manifest.parquet"]
    if loc.root is None:
        return [fallback]
    return [loc.root / f"rdml-{reader.name}.manifest.parquet", fallback]


def load_rows(cfg: DataConfig) -> tuple[Reader, Located, Rows, Path | None, bool]:
    """Locate the dataset and return its manifest rows, reading an up-to-date manifest if there is
    one and otherwise scanning the listing and writing the manifest.

    Returns ``(reader, located, rows, manifest_path, reused)``; ``manifest_path`` is None if no
    manifest could be written (read-only locations: harmless, the listing is scanned next time).
    """
    reader = get_reader(cfg.name)
    if cfg.split != "default" and cfg.split not in reader.splits:
        offered = ", ".join(("default", *reader.splits))
        raise DataError(
            f"data.split={cfg.split} is not available for dataset {cfg.name!r} (it has a fixed protocol); "
            f"use data.split={offered.split(', ')[0]} (offered: {offered})"
        )
    loc = reader.locate(resolve_root(cfg))
    sources = file_signature(loc.sources, loc.base)
    params = reader.params(cfg)
    candidates = _manifest_candidates(reader, cfg, loc)
    for path in candidates:
        rows = read_manifest(path, reader.name, sources, params)
        if rows is not None:
            return reader, loc, rows, path, True
    rows = reader.scan(loc, cfg)
    for path in candidates:
        if write_manifest(path, rows, reader.name, sources, params):
            return reader, loc, rows, path, False
    return reader, loc, rows, None, False


def _limit(rows: Rows, limit: int | None) -> Rows:
    """A fixed (seed 0) random subset of ``limit`` rows kept in dataset order.

    Not literally the first N rows: listings are sorted by class, so the first N images of CUB would
    be one or two classes; a fixed random subset keeps the class variety retrieval metrics need.
    """
    if limit is None or limit >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(0).permutation(len(rows))[:limit])
    return rows.take(keep)


def split_rows(reader: Reader, rows: Rows, cfg: DataConfig) -> tuple[Rows, Rows, tuple[str, ...]]:
    """``(train rows, test rows, test members)`` as :func:`build_datasets` uses them (limits applied)."""
    train_rows = _limit(rows.select("train"), cfg.limit_train)
    if reader.label_spaces and "test" in reader.label_spaces:
        members = tuple(reader.label_spaces["test"])
        test_rows = rows.take(np.flatnonzero(np.isin(rows.split, list(members))))
    else:
        members = ()
        test_rows = rows.select("test")
    return train_rows, _limit(test_rows, cfg.limit_test), members


def build_datasets(cfg: DataConfig) -> DatasetSplits:
    """The train and (full, zero-shot) test splits of ``cfg.name``; In-Shop also gets query/gallery.

    Labels are contiguous 0..K-1 within each split (``.class_ids`` keeps the original ids);
    ``data.limit_train`` / ``data.limit_test`` restrict the splits to a fixed random subset (labels are
    remapped again so they stay contiguous). Missing or malformed data raises one :class:`DataError`
    that names the dataset, the path looked at, the expected layout and where to get the data.
    """
    reader, loc, rows, manifest_path, reused = load_rows(cfg)
    image_size = cfg.image_size or reader.native_size
    train_rows, test_rows, members = split_rows(reader, rows, cfg)
    for split, r in (("train", train_rows), ("test", test_rows)):
        if len(r) == 0:
            raise reader.error(f"the {split} split is empty", loc.root)
    train = reader.build(loc, train_rows, "train", cfg, image_size)
    test = reader.build(loc, test_rows, "test", cfg, image_size)
    sub = {m: SubsetDataset(test, np.flatnonzero(test_rows.split == m)) for m in members}
    return DatasetSplits(
        train=train, test=test, query=sub.get("query"), gallery=sub.get("gallery"),
        manifest_path=manifest_path, manifest_reused=reused,
    )


@dataclass
class DatasetStatus:
    """One line of ``rdml datasets``: where a dataset is looked for and what was found there."""

    name: str
    title: str
    root: Path | None
    state: str  # "bundled" | "present" | "missing" | "invalid"
    counts: dict[str, tuple[int, int]]  # split -> (images, classes)
    message: str = ""


def dataset_status(
    cfg: DataConfig | None = None, names: list[str] | tuple[str, ...] | None = None, root_dir: Path | None = None,
    check: bool = False,
) -> list[DatasetStatus]:
    """Check each dataset: its resolved root, whether its files are there, and split sizes.

    ``root_dir`` is a parent directory holding one folder per dataset (``<root_dir>/cub``, ...).
    Otherwise ``cfg.root`` applies to ``cfg.name`` and the default root to the others. Only the
    listing files are read (via the manifest), not the images; with ``check`` every listed image file
    is also checked (:func:`rdml.data.check.check_files`: it exists and its header decodes), and a data
    set with missing or unreadable files is ``invalid``.
    """
    cfg = cfg or DataConfig()
    out: list[DatasetStatus] = []
    for name in names or DATASET_NAMES:
        reader = get_reader(name)
        if root_dir is not None:
            root: Path | None = Path(root_dir).expanduser() / name
        elif name == cfg.name and cfg.root is not None:
            root = Path(cfg.root).expanduser()
        else:
            root = None
        sub = cfg.model_copy(update={"name": name, "root": root})
        resolved = resolve_root(sub)
        try:
            _, _, rows, _, _ = load_rows(sub)
        except DataError as err:
            exists = resolved is not None and resolved.exists()
            first = str(err).splitlines()[0].split(": ", 1)[-1]
            if not exists:
                first += f"; get it from {reader.url}"
            out.append(DatasetStatus(name, reader.title, resolved, "invalid" if exists else "missing", {}, first))
            continue
        counts: dict[str, tuple[int, int]] = {}
        for split in sorted(set(rows.split.tolist()), key=("train", "test", "query", "gallery").index):
            mask = rows.split == split
            counts[split] = (int(mask.sum()), len(np.unique(rows.class_id[mask])))
        state = "bundled" if reader.embedded else "present"
        message = ""
        if check:
            from rdml.data.check import check_files

            report = check_files(sub, all_rows=True)
            message = report.summary()
            if not report.ok:
                state = "invalid"
        out.append(DatasetStatus(name, reader.title, resolved, state, counts, message))
    return out
