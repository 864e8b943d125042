"""The data-set check: every listed image file exists and its header decodes, before training starts.

Why: images are read lazily, so a missing or corrupt file used to surface only when a batch or the
end-of-epoch evaluation reached it (a whole epoch lost, and under Ray a long worker traceback before
the message). :func:`check_dataset` runs before the first training step (``rdml train``; the ensemble
command should call it too) and ``rdml datasets --check`` runs it on demand.

What is checked, per image file of the splits a run uses (``data.limit_*`` applied): it exists, PIL
can open it (format and header parse), and, where PIL implements it, ``verify()`` passes (PNG: every
chunk's CRC, so a truncated PNG is found). A JPEG's entropy-coded body is not decoded: that costs about
2 ms per image (minutes for SOP), against 0.04 ms for the header, so a JPEG cut off mid-scan is still
found only when it is loaded (with the file named, :class:`rdml.data.base.ImageFileDataset`).
Embedded data sets (digits, mnist5k) and IDX files (MNIST, Fashion-MNIST) have no image files.

Fast: the files are checked by a thread pool (``open`` and ``stat`` release the GIL), and the verdicts
are cached in the data set's Parquet manifest with each file's mtime and size
(:func:`rdml.data.manifest.write_checked`), so the next run only ``stat``\\ s unchanged files.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rdml.config import DataConfig
from rdml.data.manifest import read_checked, write_checked
from rdml.data.registry import load_rows, split_rows
from rdml.errors import DataError

#: offending files named in the error message (the count covers the rest)
SHOWN = 5


@dataclass
class CheckReport:
    """The outcome of :func:`check_files`: which listed files are missing or do not decode."""

    dataset: str
    files: int = 0
    cached: int = 0  # unchanged since they last passed: only stat'ed
    missing: list[Path] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    manifest: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    @property
    def bad(self) -> int:
        return len(self.missing) + len(self.corrupt)

    def summary(self) -> str:
        """One line for ``rdml datasets --check``."""
        if self.files == 0:
            return "no image files to check (embedded arrays or IDX files)"
        if self.ok:
            return f"all {self.files:,} image files present and readable ({self.cached:,} unchanged since the last check)"
        first = self.missing[0] if self.missing else self.corrupt[0][0]
        return f"{len(self.missing):,} missing, {len(self.corrupt):,} unreadable of {self.files:,} image files, e.g. {first}"

    def error(self) -> DataError:
        """The :class:`DataError` naming the first offending files, their count, and the fix."""
        lines = [f"dataset {self.dataset!r}: {self.bad:,} of {self.files:,} image files are missing or cannot be read "
                 "(found by the data-set check, before training):"]
        shown = [f"  missing: {p}" for p in self.missing[:SHOWN]]
        shown += [f"  unreadable: {p} ({why})" for p, why in self.corrupt[: max(0, SHOWN - len(shown))]]
        lines += shown
        if self.bad > len(shown):
            lines.append(f"  ... and {self.bad - len(shown):,} more ({len(self.missing):,} missing, "
                         f"{len(self.corrupt):,} unreadable in all)")
        lines.append("Fix: re-extract the data set from its archive (or delete these files and their lines in the "
                     "listing: the manifest is rebuilt when a listing changes); `rdml datasets --check "
                     f"{self.dataset}` repeats this check.")
        return DataError("\n".join(lines))


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image (None if it opens and, where PIL can, verifies)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def _workers(n: int | None) -> int:
    return n if n else min(32, 4 * (os.cpu_count() or 1))


def check_files(cfg: DataConfig, *, all_rows: bool = False, workers: int | None = None,
                use_cache: bool = True) -> CheckReport:
    """Check the image files of ``cfg``'s data set (the splits a run uses; ``all_rows``: every listed one).

    Raises :class:`DataError` only when the data set itself cannot be located or listed (as
    :func:`rdml.data.build_datasets` would); problems with individual files are in the report.
    """
    t0 = time.perf_counter()
    reader, loc, rows, manifest, _ = load_rows(cfg)
    report = CheckReport(dataset=reader.name, manifest=manifest)
    if not all_rows:
        train_rows, test_rows, _ = split_rows(reader, rows, cfg)
        listed = [*train_rows.path, *test_rows.path]
    else:
        listed = list(rows.path)
    paths = [p for p in dict.fromkeys(listed) if p is not None]
    if not paths or loc.base is None:
        report.seconds = time.perf_counter() - t0
        return report
    cached = read_checked(manifest) if use_cache else {}
    base = loc.base

    def one(rel: str) -> tuple[str, str | None, tuple[int, int] | None, bool]:
        full = base / rel
        try:
            st = os.stat(full)
        except FileNotFoundError:
            return rel, "missing", None, False
        except OSError as exc:
            return rel, f"cannot stat: {exc}", None, False
        sig = (int(st.st_mtime_ns), int(st.st_size))
        if cached.get(rel) == sig:
            return rel, None, sig, True
        return rel, image_problem(full), sig, False

    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="rdml-data-check") as pool:
        results = list(pool.map(one, paths))
    good: dict[str, tuple[int, int]] = {}
    bad: list[str] = []
    for rel, problem, sig, was_cached in results:
        if problem == "missing":
            report.missing.append(base / rel)
        elif problem is not None:
            report.corrupt.append((base / rel, problem))
        elif sig is not None:
            good[rel] = sig
            report.cached += int(was_cached)
        if problem is not None:
            bad.append(rel)
    report.files = len(paths)
    stale = [rel for rel in bad if rel in cached]
    if manifest is not None and use_cache and (len(good) > report.cached or stale):
        verdicts = {**cached, **good}
        for rel in stale:
            verdicts.pop(rel, None)
        write_checked(manifest, verdicts)
    report.seconds = time.perf_counter() - t0
    return report


def check_dataset(cfg: DataConfig, *, workers: int | None = None) -> CheckReport:
    """Check the files a run of ``cfg`` will read; :class:`DataError` naming the offending files if any.

    The library entry point for commands that train (``rdml train`` calls it before the first step;
    ``rdml ensemble`` should too): cheap on the second call (cached verdicts).
    """
    report = check_files(cfg, workers=workers)
    if not report.ok:
        raise report.error()
    return report
