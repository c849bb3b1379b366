"""Datasets for the experiments, one interface: :func:`load_dataset`.

Names:

- ``digits``, ``breast_cancer``, ``wine``: bundled with scikit-learn (no files needed);
  split 70/30, stratified, with ``split_seed``.
- ``fashion-mnist``: the standard idx files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
  ``t10k-labels-idx1-ubyte.gz``; ``.gz`` or uncompressed) from ``data_dir``,
  ``data_dir/fashion-mnist`` or ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``).
- ``cifar10``: the python pickle batches ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, in ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (format 2, cropped digits) in
  ``data_dir`` or ``data_dir/svhn``; label 10 means digit 0.
- ``csv:PATH``: a numeric CSV, last column the label (numbers or strings, mapped to
  0..C-1 in sorted order; ``1``, ``1.0`` and `` 1`` are one class; empty, ``NA`` or
  ``nan`` labels are refused with their row), an optional header row (judged on the
  whole row); split 70/30 stratified.

Features are standardized with statistics of the training split only (per channel for
images, per column for tables). Nothing is downloaded: a missing or unreadable file
raises :class:`DatasetError` naming the files expected and where they were looked for.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gyrodrop.experiments.image_transforms import (
    center_crop,
    crop_size,
    per_image_standardize,
    random_crop_flip,
)

__all__ = [
    "DATASETS",
    "DatasetError",
    "data_identity",
    "Dataset",
    "load_dataset",
    "load_arrays",
    "standardize",
    "per_image_standardize",
    "center_crop",
    "random_crop_flip",
    "crop_size",
    "stratified_folds",
    "FASHION_DIR",
]

#: Names accepted by :func:`load_dataset` besides ``csv:PATH``.
DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "fashion-mnist", "cifar10", "svhn")

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


#: ``x_train, y_train, x_test, y_test`` as NumPy arrays.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DatasetError(ValueError):
    """A dataset's files are missing or unreadable (the message says which and where)."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split ready for training.

    Attributes:
        name: the dataset's name as given.
        x_train: ``(N, *in_shape)`` float32, standardized.
        y_train: ``(N,)`` int64 in ``[0, num_classes)``.
        x_test: ``(M, *in_shape)`` float32, standardized with the training statistics.
        y_test: ``(M,)`` int64.
        num_classes: number of classes.
        classes: class names (strings), index = label.
        x_val, y_val: a validation split held out of the training split (study runs).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    classes: tuple[str, ...]
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dim."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        """One line: name, sizes, shape, classes."""
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"shape {self.in_shape}, {self.num_classes} classes"
        )


# --------------------------------------------------------------------------- arrays


def _search_dirs(
    data_dir: str | Path | None, subdirs: Sequence[str], defaults: Sequence[Path]
) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        dirs += [base / s for s in subdirs] + [base]
    dirs += list(defaults)
    return dirs


def _missing(name: str, files: Sequence[str], dirs: Sequence[Path], hint: str = "") -> DatasetError:
    where = ", ".join(str(d) for d in dirs) or "(no directory given)"
    return DatasetError(
        f"{name}: expected files {', '.join(files)} in one of: {where}; nothing is downloaded{hint}"
    )


def _find_dir(
    name: str, files: Sequence[str], dirs: Sequence[Path], alt: Sequence[str] = ()
) -> Path:
    """First dir holding every file (each file may also exist with a suffix in ``alt``)."""
    for d in dirs:
        if all(any((d / (f + s)).is_file() for s in ("", *alt)) for f in files):
            return d
    raise _missing(
        name,
        [f + (alt[0] if alt else "") for f in files],
        dirs,
        "; pass --data-dir DIR holding them",
    )


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format): magic 0x0000080D (ubyte), dims, big-endian sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"fashion-mnist: cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"fashion-mnist: {path} is not an idx ubyte file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"fashion-mnist: {path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(shape)
    if len(data) - header != count:
        raise DatasetError(
            f"fashion-mnist: {path} is truncated or corrupt: header says {shape} "
            f"({count} bytes), file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _fashion(data_dir: str | Path | None) -> Arrays:
    dirs = _search_dirs(data_dir, ["fashion-mnist", "fashion_mnist", "FashionMNIST"], [FASHION_DIR])
    d = _find_dir("fashion-mnist", FASHION_FILES, dirs, alt=(".gz",))

    def read(stem: str) -> np.ndarray:
        path = d / (stem + ".gz") if (d / (stem + ".gz")).is_file() else d / stem
        return _read_idx(path)

    xtr, ytr, xte, yte = (read(f) for f in FASHION_FILES)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"fashion-mnist: {split} images {x.shape} and labels {y.shape} do not match "
                f"(expected (N, 28, 28) and (N,)) in {d}"
            )
    return xtr[:, None], ytr, xte[:, None], yte


def _cifar(data_dir: str | Path | None) -> Arrays:
    dirs = _search_dirs(data_dir, ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"], [])
    d = _find_dir("cifar10", CIFAR_FILES, dirs)

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = d / fname
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # pickle raises many types on corrupt input
            raise DatasetError(
                f"cifar10: cannot read {path} as a CIFAR-10 python batch "
                f"(a pickled dict with b'data' (N, 3072) and b'labels'): {e}"
            ) from e
        if len(data) != len(labels):
            raise DatasetError(f"cifar10: {path} has {len(data)} images but {len(labels)} labels")
        return data, labels

    train = [read(f) for f in CIFAR_FILES[:-1]]
    xte, yte = read(CIFAR_FILES[-1])
    xtr = np.concatenate([b[0] for b in train])
    ytr = np.concatenate([b[1] for b in train])
    return xtr, ytr, xte, yte


def _svhn(data_dir: str | Path | None) -> Arrays:
    dirs = _search_dirs(data_dir, ["svhn", "SVHN"], [])
    d = _find_dir("svhn", SVHN_FILES, dirs)
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn
        raise DatasetError(
            'svhn: reading .mat files needs scipy: pip install "gyrodrop[experiments]"'
        ) from e

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = d / fname
        try:
            mat = loadmat(path)
            x = np.asarray(mat["X"], dtype=np.uint8)  # (32, 32, 3, N)
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        except Exception as e:
            raise DatasetError(
                f"svhn: cannot read {path} as an SVHN format-2 .mat file "
                f"(X: (32, 32, 3, N), y: (N, 1)): {e}"
            ) from e
        if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
            raise DatasetError(f"svhn: {path}: X has shape {x.shape}, y has {len(y)} labels")
        y = np.where(y == 10, 0, y)
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y

    xtr, ytr = read(SVHN_FILES[0])
    xte, yte = read(SVHN_FILES[1])
    return xtr, ytr, xte, yte


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        from sklearn import datasets
    except ImportError as e:
        raise DatasetError(
            f'{name}: the bundled datasets need scikit-learn: pip install "gyrodrop[experiments]"'
        ) from e
    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }[name]
    bunch = loader()
    names = tuple(str(c) for c in getattr(bunch, "target_names", np.unique(bunch.target)))
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64), names


#: Label cells refused as missing values (compared case-insensitively).
MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _canonical_number(value: float) -> str:
    """``1``, ``1.0`` and `` 1`` -> ``"1"``; ``0.5`` -> ``"0.5"``."""
    return str(int(value)) if value.is_integer() else repr(value)


def _is_header(rows: list[list[str]]) -> bool:
    """Whether the first row is a header, judged on the whole row.

    It is when one of its feature cells is not a number, or when its label is not a
    number and either every other label is one (``0,1,2,3,label``) or it occurs in no
    other row (``1,2,class`` over labels ``R``/``M``: a class of one example could not
    be split into train and test anyway). A numeric first row with a numeric label is
    data.
    """
    first = [c.strip() for c in rows[0]]
    if any(_float_or_none(c) is None for c in first[:-1]):
        return True
    rest = [r[-1].strip() for r in rows[1:] if r]
    if not rest:
        return False
    label = first[-1]
    rest_numeric = all(
        _float_or_none(c) is not None for c in rest if c.lower() not in MISSING_LABELS
    )
    if _float_or_none(label) is None:
        return rest_numeric or label not in rest
    return False


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Features, labels ``0..C-1`` and class names of a CSV (last column the label).

    Numeric labels are one class per value (``1``, ``1.0`` and `` 1`` are one class,
    named ``1``), ordered by value; other labels are classes named as found, in sorted
    order. Empty and missing labels (``NA``, ``nan``, ...) are refused with the row.
    """
    if not path.is_file():
        raise DatasetError(
            f"csv: expected a file at {path} (numeric columns, last column the label); "
            "nothing is downloaded"
        )
    try:
        with open(path, newline="") as f:
            sample = f.read(4096)
            f.seek(0)
            try:
                dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, ",;\t ")
            except csv.Error:
                dialect = csv.excel
            numbered = [
                (n, r)
                for n, r in enumerate(csv.reader(f, dialect), start=1)
                if r and any(c.strip() for c in r)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"csv: cannot read {path}: {e}") from e
    if not numbered:
        raise DatasetError(f"csv: {path} is empty; expected numeric columns, last the label")
    if _is_header([r for _, r in numbered]):
        numbered = numbered[1:]
    width = len(numbered[0][1]) if numbered else 0
    if width < 2:
        raise DatasetError(f"csv: {path} needs at least 2 columns (features, then the label)")
    feats: list[list[float]] = []
    labels: list[str] = []
    for line, row in numbered:
        if len(row) != width:
            raise DatasetError(f"csv: {path} row {line} has {len(row)} columns, expected {width}")
        try:
            feats.append([float(c) for c in row[:-1]])
        except ValueError as e:
            raise DatasetError(f"csv: {path} row {line} has a non-numeric feature: {e}") from e
        label = row[-1].strip()
        if label.lower() in MISSING_LABELS:
            raise DatasetError(
                f"csv: {path} row {line} has a missing label {row[-1]!r}; every row needs a class"
            )
        labels.append(label)
    numbers = [_float_or_none(v) for v in labels]
    if all(v is not None for v in numbers):
        values = [float(v) for v in numbers if v is not None]
        for (line, _), v in zip(numbered, values, strict=True):
            if not math.isfinite(v):
                raise DatasetError(f"csv: {path} row {line} has a non-finite label {v}")
        keys = sorted(set(values))
        index: dict[Any, int] = {k: i for i, k in enumerate(keys)}
        y = np.array([index[v] for v in values], dtype=np.int64)
        names = tuple(_canonical_number(k) for k in keys)
    else:
        skeys = sorted(set(labels))
        index = {k: i for i, k in enumerate(skeys)}
        y = np.array([index[v] for v in labels], dtype=np.int64)
        names = tuple(skeys)
    if len(names) < 2:
        raise DatasetError(f"csv: {path} has a single label value {list(names)}; need >= 2 classes")
    x = np.asarray(feats, dtype=np.float64)
    if not np.isfinite(x).all():
        raise DatasetError(f"csv: {path} has NaN or infinite features")
    return x, y, names


def _hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {e}") from e
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_identity(name: str, data_dir: str | Path | None = None) -> str | None:
    """A content hash (16 hex digits) of the files ``name`` is read from, or ``None`` for
    the datasets bundled with scikit-learn: part of every run's key, so that changed
    files train new runs instead of reporting old ones.

    Raises:
        DatasetError: the files are missing (the message names them).
    """
    if name.startswith("csv:"):
        path = Path(name[4:]).expanduser()
        if not path.is_file():
            raise DatasetError(f"csv: expected a file at {path}; nothing is downloaded")
        return _hash_files([path])
    if name == "fashion-mnist":
        dirs = _search_dirs(
            data_dir, ["fashion-mnist", "fashion_mnist", "FashionMNIST"], [FASHION_DIR]
        )
        d = _find_dir("fashion-mnist", FASHION_FILES, dirs, alt=(".gz",))
        return _hash_files(
            [d / (f + ".gz") if (d / (f + ".gz")).is_file() else d / f for f in FASHION_FILES]
        )
    if name == "cifar10":
        dirs = _search_dirs(data_dir, ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"], [])
        d = _find_dir("cifar10", CIFAR_FILES, dirs)
        return _hash_files([d / f for f in CIFAR_FILES])
    if name == "svhn":
        d = _find_dir("svhn", SVHN_FILES, _search_dirs(data_dir, ["svhn", "SVHN"], []))
        return _hash_files([d / f for f in SVHN_FILES])
    return None


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.3) -> Arrays:
    """Stratified train/test split, seeded (a local generator)."""
    g = torch.Generator().manual_seed(seed)
    test_idx: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_idx.append(idx[:n_test])
    te = np.sort(np.concatenate(test_idx))
    tr = np.setdiff1d(np.arange(len(y)), te)
    return x[tr], y[tr], x[te], y[te]


def stratified_folds(y: np.ndarray | Tensor, k: int, seed: int) -> list[np.ndarray]:
    """Indices of the ``k`` test folds of a stratified k-fold split (seeded).

    Each class's examples are shuffled and dealt round-robin, so fold sizes differ by
    at most one per class.

    Example:
        >>> folds = stratified_folds(np.array([0] * 6 + [1] * 4), 2, seed=0)
        >>> [len(f) for f in folds], sorted(np.concatenate(folds).tolist()) == list(range(10))
        ([5, 5], True)
    """
    y = np.asarray(y)
    if k < 2:
        raise ValueError(f"stratified_folds: k must be >= 2, got {k}")
    _, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        raise ValueError(
            f"stratified_folds: the smallest class has {counts.min()} examples, fewer than "
            f"k={k} folds"
        )
    g = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def load_arrays(
    name: str, data_dir: str | Path | None = None, *, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Raw (unstandardized) ``x_train, y_train, x_test, y_test, classes`` of ``name``."""
    if name.startswith("csv:"):
        x, y, classes = _read_csv(Path(name[4:]).expanduser())
        return (*_split(x, y, split_seed), classes)
    if name in ("digits", "breast_cancer", "wine"):
        x, y, classes = _sklearn(name)
        return (*_split(x, y, split_seed), classes)
    if name == "fashion-mnist":
        classes = (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        )
        return (*_fashion(data_dir), classes)
    if name == "cifar10":
        classes = (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        )
        return (*_cifar(data_dir), classes)
    if name == "svhn":
        return (*_svhn(data_dir), tuple(str(i) for i in range(10)))
    raise DatasetError(
        f"load_dataset: name must be one of {', '.join(DATASETS)} or csv:PATH, got {name!r}"
    )


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[Tensor, Tensor]:
    """Standardize with training statistics only: per channel for images
    ``(N, C, H, W)``, per column otherwise. Constant columns are only centred.

    Example:
        >>> tr, te = standardize(np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([[4.0, 3.0]]))
        >>> tr.tolist(), te.tolist()
        ([[-1.0, 0.0], [1.0, 0.0]], [[3.0, 2.0]])
    """
    xtr = np.asarray(x_train, dtype=np.float32)
    xte = np.asarray(x_test, dtype=np.float32)
    axes = (0, 2, 3) if xtr.ndim == 4 else (0,)
    mean = xtr.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
    std = xtr.std(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    return torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(np.ascontiguousarray(xte))


def _limit(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    idx.sort()
    return x[idx], y[idx]


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    split_seed: int = 0,
    raw: bool = False,
) -> Dataset:
    """Load ``name``, split it and standardize it with training statistics.

    Args:
        name: one of :data:`DATASETS` or ``csv:PATH``.
        data_dir: where the files of ``fashion-mnist``, ``cifar10`` and ``svhn`` live.
        limit: keep at most this many training and this many test examples (a seeded
            random subset) for quick runs.
        split_seed: seeds the train/test split of the datasets that have none.
        raw: keep the features as loaded (float32 pixel values 0..255 for images), not
            standardized; the paper recipe standardizes each image on its own later
            (:func:`per_image_standardize`).

    Raises:
        DatasetError: missing or unreadable files (the message names them).

    Example:
        >>> ds = load_dataset("digits", limit=100)
        >>> ds.in_shape, ds.num_classes, len(ds.y_train)
        ((64,), 10, 100)
    """
    if limit is not None and limit < 2:
        raise ValueError(f"load_dataset: limit must be >= 2, got {limit}")
    xtr, ytr, xte, yte, classes = load_arrays(name, data_dir, split_seed=split_seed)
    xtr, ytr = _limit(xtr, ytr, limit, split_seed)
    xte, yte = _limit(xte, yte, limit, split_seed + 1)
    if len(ytr) == 0 or len(yte) == 0:
        raise DatasetError(f"{name}: the train or test split is empty")
    num_classes = max(len(classes), int(max(ytr.max(), yte.max())) + 1)
    if num_classes < 2:
        raise DatasetError(f"{name}: need at least 2 classes, found {num_classes}")
    if int(min(ytr.min(), yte.min())) < 0:
        raise DatasetError(f"{name}: labels must be >= 0")
    if len(classes) < num_classes:
        classes = tuple(str(i) for i in range(num_classes))
    if raw:
        x_train = torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32))
        x_test = torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32))
    else:
        x_train, x_test = standardize(xtr, xte)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(np.array(ytr, dtype=np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(np.array(yte, dtype=np.int64)),
        num_classes=num_classes,
        classes=tuple(classes),
    )
