"""The data-set check: missing and corrupt image files are named before the first training step (and by
`rdml datasets --check`); verdicts are cached in the manifest; embedded data sets need no check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_data import make_cub, make_folder

from rdml.cli import main
from rdml.config import DataConfig
from rdml.data import build_datasets
from rdml.data.check import check_dataset, check_files
from rdml.errors import DataError


def cub_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="cub", root=root, image_size=32, **kw)


def test_missing_and_corrupt_images_are_named_with_a_count(tmp_path):
    make_cub(tmp_path)
    splits = build_datasets(cub_cfg(tmp_path))
    missing, corrupt = Path(splits.train.paths[2]), Path(splits.test.paths[4])
    missing.unlink()
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    report = check_files(cub_cfg(tmp_path))
    assert report.files == 18 and report.missing == [missing] and [p for p, _ in report.corrupt] == [corrupt]
    with pytest.raises(DataError) as info:
        check_dataset(cub_cfg(tmp_path))
    msg = str(info.value)
    assert "2 of 18 image files" in msg and f"missing: {missing}" in msg and f"unreadable: {corrupt}" in msg
    assert "Fix:" in msg and "rdml datasets --check cub" in msg


def test_many_bad_files_show_the_first_few_and_a_count(tmp_path):
    make_cub(tmp_path, per_class=4)
    splits = build_datasets(cub_cfg(tmp_path))
    for p in splits.train.paths[:9]:
        Path(p).unlink()
    msg = str(check_files(cub_cfg(tmp_path)).error())
    assert msg.count("  missing: ") == 5 and "... and 4 more (9 missing, 0 unreadable in all)" in msg


def test_truncated_png_and_folder_layout(tmp_path):
    make_folder(tmp_path)
    png = tmp_path / "cat" / "1.png"
    png.write_bytes(png.read_bytes()[:-30])  # cut off: PIL's verify() finds the broken chunk
    report = check_files(DataConfig(name="folder", root=tmp_path, image_size=32))
    assert [p for p, _ in report.corrupt] == [png] and not report.missing and report.files == 12


def test_verdicts_are_cached_in_the_manifest_and_changes_are_rechecked(tmp_path):
    make_cub(tmp_path)
    first = check_files(cub_cfg(tmp_path))
    assert first.ok and first.cached == 0 and first.manifest is not None
    second = check_files(cub_cfg(tmp_path))
    assert second.ok and second.cached == 18  # unchanged files are only stat'ed
    build_datasets(cub_cfg(tmp_path))  # the manifest (with the verdict columns) still reads as up to date
    assert build_datasets(cub_cfg(tmp_path)).manifest_reused

    victim = Path(build_datasets(cub_cfg(tmp_path)).train.paths[0])
    victim.write_bytes(b"not an image at all")
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = check_files(cub_cfg(tmp_path))
    assert [p for p, _ in third.corrupt] == [victim] and third.cached == 17
    assert [p for p, _ in check_files(cub_cfg(tmp_path)).corrupt] == [victim]  # not cached as good


def test_embedded_and_idx_data_sets_have_nothing_to_check():
    report = check_dataset(DataConfig(name="digits"))
    assert report.ok and report.files == 0 and "no image files" in report.summary()


def test_train_reports_a_missing_image_before_the_first_step(tmp_path, capsys):
    make_cub(tmp_path / "cub")
    splits = build_datasets(cub_cfg(tmp_path / "cub"))
    missing = Path(splits.train.paths[5])
    missing.unlink()
    t0 = time.perf_counter()
    code = main(["train", "--no-ray", "--set", "data.name=cub", "--set", f"data.root={tmp_path / 'cub'}",
                 "--set", "data.image_size=32", "--set", f"train.output_dir={tmp_path / 'runs'}",
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 20
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # no run, no step


def test_train_reports_a_corrupt_test_image_before_the_first_step(tmp_path, capsys):
    """A bad *test* image used to surface only at the end-of-epoch evaluation, an epoch too late."""
    make_cub(tmp_path / "cub")
    corrupt = Path(build_datasets(cub_cfg(tmp_path / "cub")).test.paths[-1])
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = main(["train", "--no-ray", "--set", "data.name=cub", "--set", f"data.root={tmp_path / 'cub'}",
                 "--set", "data.image_size=32", "--set", f"train.output_dir={tmp_path / 'runs'}",
                 "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"unreadable: {corrupt}" in err
    assert not (tmp_path / "runs").exists()


def test_datasets_check_command(tmp_path, capsys):
    make_cub(tmp_path / "cub")
    args = ["datasets", "--root-dir", str(tmp_path), "--check", "cub", "digits"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "all 18 image files present and readable" in out and "no image files to check" in out
    bad = Path(build_datasets(cub_cfg(tmp_path / "cub")).train.paths[0])
    bad.unlink()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "invalid" in out and "1 missing" in out and bad.name in out
    assert main(["datasets", "--root-dir", str(tmp_path), "cub"]) == 0  # without --check: listings only
    assert "present" in capsys.readouterr().out
