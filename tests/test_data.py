"""Dataset readers, zero-shot splits, manifests and error messages, on tiny fixtures written in each
benchmark's exact on-disk layout (real PNG/JPEG files, a real cars_annos.mat, real IDX headers)."""

from __future__ import annotations

import argparse
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdml.config import DataConfig
from rdml.data import SubsetDataset, build_datasets, dataset_status, make_eval_loader, resolve_root
from rdml.errors import DataError

SIZE = 32  # tiny crops keep the image tests fast


# ----------------------------------------------------------------------------- fixture writers


def write_image(path: Path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(30, 48)), int(rng.integers(30, 48))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    img.save(path)


def make_cub(root: Path, classes=(1, 2, 3, 101, 102, 103), per_class: int = 3, subfolder: bool = False) -> Path:
    d = root / "CUB_200_2011" if subfolder else root
    images, labels = [], []
    k = 0
    for c in classes:
        for j in range(per_class):
            k += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j:04d}_{k}.jpg"
            write_image(d / "images" / rel, k, mode="L" if k == 1 else "RGB")  # CUB has grayscale JPEGs
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_cars(root: Path, classes=(1, 2, 98, 99, 150, 196), per_class: int = 2) -> Path:
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = len(classes) * per_class
    ann = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    k = 0
    for c in classes:
        for _ in range(per_class):
            rel = f"car_ims/{k + 1:06d}.jpg"
            write_image(root / rel, 1000 + k)
            ann[0, k] = (rel, np.array([[1]], np.uint8), np.array([[2]], np.uint8), np.array([[20]], np.uint8),
                         np.array([[20]], np.uint8), np.array([[c]], np.uint8), np.array([[k % 2]], np.uint8))
            k += 1
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Make Model {i + 1}"
    savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return root


def make_sop(root: Path, train_classes=(1, 2, 3), test_classes=(11319, 11320, 11321), per_class: int = 2) -> Path:
    d = root / "Stanford_Online_Products"
    k = 0
    for name, classes in (("train", train_classes), ("test", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(per_class):
                k += 1
                rel = f"bicycle_final/{c}_{j}.JPG"
                write_image(d / rel, 2000 + k)
                lines.append(f"{k} {c} 1 {rel}")
        (d / f"Ebay_{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path) -> Path:
    rows = []
    k = 0
    spec = {"train": [1, 2, 7], "query": [3, 4, 5], "gallery": [3, 4, 5]}
    for status, items in spec.items():
        for item in items:
            for j in range(2):
                k += 1
                rel = f"img/WOMEN/Dresses/id_{item:08d}/{j:02d}_{status}_front.jpg"
                write_image(root / "Img" / rel, 3000 + k)
                rows.append(f"{rel}   id_{item:08d}   {status}")
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(directory: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(directory / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[prefix] = (x, y)
    return out


def make_folder(root: Path, classes=("ant", "bee", "cat", "dog"), per_class: int = 3) -> Path:
    for i, c in enumerate(classes):
        for j in range(per_class):
            write_image(root / c / f"{j}.{'png' if j % 2 else 'jpg'}", 4000 + 10 * i + j)
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def data_cfg(name: str, root: Path | None, **kw) -> DataConfig:
    return DataConfig(name=name, root=root, image_size=kw.pop("image_size", SIZE), **kw)


def assert_split_protocol(ds, split_classes: set[int] | None = None) -> None:
    """Contiguous labels, consistent with class ids (same id <-> same label)."""
    assert ds.labels.dtype == np.int64 and ds.class_ids.dtype == np.int64
    assert set(ds.labels.tolist()) == set(range(ds.num_classes))
    pairs = set(zip(ds.class_ids.tolist(), ds.labels.tolist(), strict=True))
    assert len(pairs) == ds.num_classes  # a bijection between class ids and labels
    if split_classes is not None:
        assert set(ds.class_ids.tolist()) == split_classes


# ----------------------------------------------------------------------------- digits (embedded)


def test_digits_zero_shot_split(tmp_path):
    s = build_datasets(DataConfig(name="digits", manifest_dir=tmp_path))
    assert len(s.train) + len(s.test) == 1797
    assert set(s.train.class_ids.tolist()) == {0, 1, 2, 3, 4}
    assert set(s.test.class_ids.tolist()) == {5, 6, 7, 8, 9}
    assert_split_protocol(s.train)
    assert_split_protocol(s.test)
    assert np.array_equal(s.test.labels, s.test.class_ids - 5)  # remapped to 0..4
    assert (s.train.in_channels, s.train.image_size, s.train.num_classes) == (1, 28, 5)
    x, y, i = s.test[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert (y, i) == (int(s.test.labels[7]), 7)
    assert s.query is None and s.gallery is None
    small = build_datasets(DataConfig(name="digits", manifest_dir=tmp_path, image_size=16))
    assert small.train[0][0].shape == (1, 16, 16)


def test_digits_limits_keep_contiguous_labels(tmp_path):
    s = build_datasets(DataConfig(name="digits", manifest_dir=tmp_path, limit_train=100, limit_test=60))
    assert (len(s.train), len(s.test)) == (100, 60)
    assert_split_protocol(s.train)
    assert_split_protocol(s.test)
    assert s.train.num_classes == 5  # a random subset keeps the classes, not the first class only


# ----------------------------------------------------------------------------- MNIST / Fashion


@pytest.mark.parametrize("layout", ["flat_gz", "raw_plain", "torchvision"])
def test_mnist_idx(tmp_path, layout):
    name = "fashion" if layout == "torchvision" else "mnist"
    sub = {"flat_gz": "", "raw_plain": "raw", "torchvision": "FashionMNIST/raw"}[layout]
    data = make_mnist(tmp_path / sub if sub else tmp_path, gz=layout != "raw_plain")
    s = build_datasets(data_cfg(name, tmp_path, image_size=None))
    assert (len(s.train), len(s.test)) == (60, 20)
    # MNIST protocol: same 10 classes in train and test (not zero-shot)
    assert set(s.train.class_ids.tolist()) == set(s.test.class_ids.tolist()) == set(range(10))
    assert_split_protocol(s.train)
    x, y, _ = s.test[3]
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x[0], torch.from_numpy(data["t10k"][0][3]).float() / 255)
    assert y == data["t10k"][1][3]
    assert resolve_root(data_cfg(name, tmp_path)) == tmp_path


def test_mnist_bad_magic_is_a_data_error(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*not a valid IDX"):
        build_datasets(data_cfg("mnist", tmp_path))


# ----------------------------------------------------------------------------- 224 benchmarks


@pytest.mark.parametrize("subfolder", [False, True])
def test_cub_zero_shot(tmp_path, subfolder):
    make_cub(tmp_path, subfolder=subfolder)
    s = build_datasets(data_cfg("cub", tmp_path))
    assert (len(s.train), len(s.test)) == (9, 9)
    assert_split_protocol(s.train, {1, 2, 3})
    assert_split_protocol(s.test, {101, 102, 103})
    assert s.test.class_names[101] == "101.Bird_101"
    x, y, i = s.train[0]  # a grayscale JPEG comes back as 3 channels
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert (s.train.in_channels, s.train.image_size) == (3, SIZE)
    # test transform is deterministic (resize + center crop), train transform augments
    assert torch.equal(s.test[2][0], s.test[2][0])
    assert not s.test.augments and s.train.augments


def test_cars_from_annos_mat(tmp_path):
    make_cars(tmp_path)
    s = build_datasets(data_cfg("cars", tmp_path))
    assert_split_protocol(s.train, {1, 2, 98})
    assert_split_protocol(s.test, {99, 150, 196})
    assert (len(s.train), len(s.test)) == (6, 6)
    assert s.test.class_names[196] == "Make Model 196"
    assert s.test[5][0].shape == (3, SIZE, SIZE)


def test_sop_uses_class_id(tmp_path):
    make_sop(tmp_path)
    s = build_datasets(data_cfg("sop", tmp_path))
    assert_split_protocol(s.train, {1, 2, 3})
    assert_split_protocol(s.test, {11319, 11320, 11321})
    assert s.test.paths[0].endswith("Stanford_Online_Products/bicycle_final/11319_0.JPG")
    assert s.train[1][0].shape == (3, SIZE, SIZE)


def test_inshop_query_gallery(tmp_path):
    make_inshop(tmp_path)
    s = build_datasets(data_cfg("inshop", tmp_path))
    assert (len(s.train), len(s.test), len(s.query), len(s.gallery)) == (6, 12, 6, 6)
    assert_split_protocol(s.train, {1, 2, 7})
    assert_split_protocol(s.test, {3, 4, 5})
    # query and gallery are views of the test set: shared label space, global (test) indices
    assert sorted(np.concatenate([s.query.indices, s.gallery.indices]).tolist()) == list(range(12))
    for q in range(len(s.query)):
        same = s.gallery.class_ids == s.query.class_ids[q]
        assert same.sum() == 2 and np.all(s.gallery.labels[same] == s.query.labels[q])
    _, y, idx = s.gallery[0]
    assert idx == s.gallery.indices[0] and y == s.test.labels[idx]


def test_folder_default_and_explicit_split(tmp_path):
    make_folder(tmp_path)
    s = build_datasets(data_cfg("folder", tmp_path))
    assert [s.train.class_names[c] for c in sorted(set(s.train.class_ids.tolist()))] == ["ant", "bee"]
    assert [s.test.class_names[c] for c in sorted(set(s.test.class_ids.tolist()))] == ["cat", "dog"]
    assert (len(s.train), len(s.test)) == (6, 6)  # notes.txt is not an image
    s = build_datasets(data_cfg("folder", tmp_path, train_classes=["dog", "ant", "bee"]))
    assert (len(s.train), len(s.test)) == (9, 3) and s.test.num_classes == 1
    assert not s.manifest_reused  # other class lists: the manifest was rebuilt
    with pytest.raises(DataError, match=r"unknown classes \['cow'\]"):
        build_datasets(data_cfg("folder", tmp_path, test_classes=["cow"]))


def test_subset_keeps_labels_and_global_indices(tmp_path):
    make_cub(tmp_path)
    s = build_datasets(data_cfg("cub", tmp_path))
    sub = SubsetDataset(s.train, [8, 2, 5])
    nested = SubsetDataset(sub, [2, 0])
    assert np.array_equal(sub.labels, s.train.labels[[8, 2, 5]])
    assert [nested[i][2] for i in range(2)] == [5, 8]
    assert nested[0][1] == s.train.labels[5]
    assert (nested.num_classes, nested.in_channels, nested.image_size) == (3, 3, SIZE)
    batches = list(make_eval_loader(sub, DataConfig(eval_batch_size=2)))
    assert [b[2].tolist() for b in batches] == [[8, 2], [5]]


# ----------------------------------------------------------------------------- manifests


def test_manifest_written_then_reused_without_rescan(tmp_path):
    root = make_sop(tmp_path / "sop")
    first = build_datasets(data_cfg("sop", root))
    assert first.manifest_path == root / "rdml-sop.manifest.parquet" and first.manifest_path.is_file()
    assert not first.manifest_reused
    import pyarrow.parquet as pq

    table = pq.read_table(first.manifest_path)
    assert {"path", "index", "label", "class_id", "split"} <= set(table.column_names)
    assert sorted(set(table.column("split").to_pylist())) == ["test", "train"]
    # Replace the listing with garbage of the same size and mtime: a re-scan would fail to parse it,
    # so a successful load proves that the manifest was read instead.
    listing = root / "Stanford_Online_Products" / "Ebay_train.txt"
    st = listing.stat()
    listing.write_bytes(b"x" * st.st_size)
    os.utime(listing, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = build_datasets(data_cfg("sop", root))
    assert second.manifest_reused
    assert np.array_equal(second.train.class_ids, first.train.class_ids)
    assert second.train.paths == first.train.paths


def test_stale_manifest_is_rebuilt(tmp_path):
    root = make_cub(tmp_path, classes=(1, 101))
    mdir = tmp_path / "manifests"
    assert not build_datasets(data_cfg("cub", root, manifest_dir=mdir)).manifest_reused
    assert list(mdir.glob("rdml-cub-*.manifest.parquet")) and not (root / "rdml-cub.manifest.parquet").exists()
    assert build_datasets(data_cfg("cub", root, manifest_dir=mdir)).manifest_reused
    # add a class-102 image to the listing: size and mtime change, so the manifest is rebuilt
    write_image(root / "images" / "102.Bird_102" / "x.jpg", 9)
    with open(root / "images.txt", "a") as f:
        f.write("99 102.Bird_102/x.jpg\n")
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("99 102\n")
    s = build_datasets(data_cfg("cub", root, manifest_dir=mdir))
    assert not s.manifest_reused and set(s.test.class_ids.tolist()) == {101, 102}
    # a truncated manifest is rebuilt too
    path = s.manifest_path
    path.write_bytes(path.read_bytes()[:50])
    assert not build_datasets(data_cfg("cub", root, manifest_dir=mdir)).manifest_reused


# ----------------------------------------------------------------------------- errors


def test_missing_root_names_dataset_path_layout_and_source(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        build_datasets(data_cfg("cub", missing))
    msg = str(e.value)
    assert "'cub'" in msg and str(missing) in msg and "images.txt" in msg and "image_class_labels.txt" in msg
    assert "expected layout" in msg and "data.caltech.edu" in msg and "data.root" in msg


@pytest.mark.parametrize("name,maker,remove,mentions", [
    ("cub", make_cub, "images.txt", "images.txt not found"),
    ("cars", make_cars, "cars_annos.mat", "cars_annos.mat not found"),
    ("sop", make_sop, "Stanford_Online_Products/Ebay_test.txt", "Ebay_test.txt not found"),
    ("inshop", make_inshop, "Eval/list_eval_partition.txt", "list_eval_partition.txt not found"),
    ("mnist", make_mnist, "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"),
])
def test_missing_listing_file(tmp_path, name, maker, remove, mentions):
    maker(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(DataError, match=mentions) as e:
        build_datasets(data_cfg(name, tmp_path))
    assert str(tmp_path) in str(e.value) and "expected layout" in str(e.value)


def test_malformed_listing_names_the_line(tmp_path):
    make_sop(tmp_path)
    listing = tmp_path / "Stanford_Online_Products" / "Ebay_test.txt"
    listing.write_text(listing.read_text() + "7 seven 1\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt line 8 is malformed"):
        build_datasets(data_cfg("sop", tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    make_cub(tmp_path)
    s = build_datasets(data_cfg("cub", tmp_path))
    bad = Path(s.train.paths[4])
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DataError, match=str(bad)):
        s.train[4]
    for workers in (0, 1):  # from a worker process too, as one clean message
        with pytest.raises(DataError) as e:
            list(make_eval_loader(s.train, DataConfig(eval_batch_size=4, num_workers=workers)))
        assert str(e.value).startswith(f"dataset 'cub': cannot read image {bad}")
        assert "Traceback" not in str(e.value)


# ----------------------------------------------------------------------------- status + command


def test_dataset_status_and_command(tmp_path, capsys):
    make_cub(tmp_path / "cub")
    make_inshop(tmp_path / "inshop")
    (tmp_path / "sop").mkdir()  # exists but empty: invalid, not missing
    cfg = DataConfig(manifest_dir=tmp_path / "manifests")
    by_name = {st.name: st for st in dataset_status(cfg, root_dir=tmp_path)}
    assert by_name["digits"].state == "bundled" and by_name["digits"].counts["train"] == (901, 5)
    assert by_name["cub"].state == "present" and by_name["cub"].counts == {"train": (9, 3), "test": (9, 3)}
    assert by_name["cub"].root == tmp_path / "cub"
    assert by_name["inshop"].counts["query"] == (6, 3)
    assert by_name["sop"].state == "invalid" and "Ebay_train.txt not found" in by_name["sop"].message
    assert by_name["cars"].state == "missing" and "stanford.edu" in by_name["cars"].message

    from rdml.commands import datasets as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(["--root-dir", str(tmp_path), "--set", f"data.manifest_dir={tmp_path}", "cub", "cars"])
    assert cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "cub" in out and "present" in out and "missing" in out and "9 imgs / 3 cls" in out
