"""Tests for gyrodrop.experiments.data: every loader on tiny files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gyrodrop.experiments.data import (
    DatasetError,
    center_crop,
    crop_size,
    data_identity,
    load_dataset,
    per_image_standardize,
    random_crop_flip,
    standardize,
    stratified_folds,
)

pytest.importorskip("sklearn")


def _idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fashion(tmp: Path, n_train: int = 30, n_test: int = 10, compress: bool = True) -> Path:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    _idx(
        tmp / f"train-images-idx3-ubyte{suffix}",
        rng.integers(0, 256, (n_train, 6, 6)),
        compress=compress,
    )
    _idx(tmp / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, compress=compress)
    _idx(
        tmp / f"t10k-images-idx3-ubyte{suffix}",
        rng.integers(0, 256, (n_test, 6, 6)),
        compress=compress,
    )
    _idx(tmp / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, compress=compress)
    return tmp


class TestBundled:
    @pytest.mark.parametrize(
        ("name", "shape", "classes"),
        [("digits", (64,), 10), ("breast_cancer", (30,), 2), ("wine", (13,), 3)],
    )
    def test_shapes_classes_and_train_statistics(
        self, name: str, shape: tuple, classes: int
    ) -> None:
        ds = load_dataset(name)
        assert ds.in_shape == shape and ds.num_classes == classes
        assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
        torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(shape), atol=1e-4, rtol=0)
        assert set(ds.y_test.tolist()) <= set(range(classes))

    def test_split_is_stratified_and_fixed_by_split_seed(self) -> None:
        a, b = load_dataset("wine", split_seed=1), load_dataset("wine", split_seed=1)
        assert torch.equal(a.x_test, b.x_test)
        assert not torch.equal(a.x_test, load_dataset("wine", split_seed=2).x_test)
        frac = torch.bincount(a.y_test) / torch.bincount(torch.cat([a.y_train, a.y_test]))
        assert torch.all((frac - 0.3).abs() < 0.05)

    def test_limit_caps_both_splits(self) -> None:
        ds = load_dataset("digits", limit=50)
        assert len(ds.y_train) == 50 and len(ds.y_test) == 50

    def test_unknown_name_lists_choices(self) -> None:
        with pytest.raises(DatasetError, match="digits, breast_cancer"):
            load_dataset("mnist-ish")


class TestFashionMnist:
    @pytest.mark.parametrize("compress", [True, False])
    def test_reads_idx_files_from_data_dir(self, tmp_path: Path, compress: bool) -> None:
        ds = load_dataset("fashion-mnist", _fashion(tmp_path, compress=compress))
        assert ds.in_shape == (1, 6, 6) and len(ds.y_train) == 30 and len(ds.y_test) == 10
        assert ds.classes[0] == "T-shirt/top"

    def test_finds_the_fashion_mnist_subdirectory(self, tmp_path: Path) -> None:
        (tmp_path / "fashion-mnist").mkdir()
        _fashion(tmp_path / "fashion-mnist")
        assert len(load_dataset("fashion-mnist", tmp_path).y_train) == 30

    def test_missing_files_name_the_expected_files(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("gyrodrop.experiments.data.FASHION_DIR", tmp_path / "nowhere")
        with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*nothing is downloaded"):
            load_dataset("fashion-mnist", tmp_path)

    def test_truncated_file_is_a_clear_error(self, tmp_path: Path) -> None:
        _fashion(tmp_path)
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:30])
        with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
            load_dataset("fashion-mnist", tmp_path)

    def test_bad_magic_is_a_clear_error(self, tmp_path: Path) -> None:
        _fashion(tmp_path)
        with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"not an idx file at all")
        with pytest.raises(DatasetError, match="bad magic"):
            load_dataset("fashion-mnist", tmp_path)


def _cifar(tmp: Path, per_batch: int = 4) -> Path:
    d = tmp / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(per_batch)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return tmp


class TestCifar10:
    def test_reads_python_batches(self, tmp_path: Path) -> None:
        ds = load_dataset("cifar10", _cifar(tmp_path))
        assert ds.in_shape == (3, 32, 32) and len(ds.y_train) == 20 and len(ds.y_test) == 4
        # per-channel standardization with training statistics
        torch.testing.assert_close(ds.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)

    def test_also_accepts_the_batch_directory_itself(self, tmp_path: Path) -> None:
        _cifar(tmp_path)
        assert len(load_dataset("cifar10", tmp_path / "cifar-10-batches-py").y_test) == 4

    def test_missing_batch_is_named(self, tmp_path: Path) -> None:
        _cifar(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
        with pytest.raises(DatasetError, match="data_batch_1, data_batch_2"):
            load_dataset("cifar10", tmp_path)

    def test_corrupt_pickle_is_a_clear_error(self, tmp_path: Path) -> None:
        _cifar(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
        with pytest.raises(DatasetError, match="test_batch"):
            load_dataset("cifar10", tmp_path)


class TestSvhn:
    def test_reads_mat_files_and_maps_label_10_to_0(self, tmp_path: Path) -> None:
        savemat = pytest.importorskip("scipy.io").savemat
        rng = np.random.default_rng(0)
        for name, n in (("train_32x32.mat", 6), ("test_32x32.mat", 4)):
            y = np.array([[10], [1], [2], [10], [3], [4]][:n])
            savemat(
                tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y}
            )
        ds = load_dataset("svhn", tmp_path)
        assert ds.in_shape == (3, 32, 32) and ds.y_train.tolist() == [0, 1, 2, 0, 3, 4]

    def test_missing_files_are_named(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="train_32x32.mat, test_32x32.mat"):
            load_dataset("svhn", tmp_path)

    def test_corrupt_mat_is_a_clear_error(self, tmp_path: Path) -> None:
        for name in ("train_32x32.mat", "test_32x32.mat"):
            (tmp_path / name).write_bytes(b"junk")
        with pytest.raises(DatasetError, match="train_32x32.mat"):
            load_dataset("svhn", tmp_path)


class TestCsv:
    def test_string_labels_map_to_sorted_ints_and_header_is_skipped(self, tmp_path: Path) -> None:
        rows = ["a,b,label"] + [f"{i},{i % 3},{'R' if i % 2 else 'M'}" for i in range(20)]
        path = tmp_path / "sonar.csv"
        path.write_text("\n".join(rows) + "\n")
        ds = load_dataset(f"csv:{path}")
        assert ds.classes == ("M", "R") and ds.in_shape == (2,) and ds.num_classes == 2
        assert len(ds.y_train) + len(ds.y_test) == 20

    def test_numeric_labels_without_header(self, tmp_path: Path) -> None:
        path = tmp_path / "kdd.csv"
        path.write_text("\n".join(f"{i}.5,{i * 2},{i % 3 + 1}" for i in range(30)))
        ds = load_dataset(f"csv:{path}")
        assert ds.classes == ("1", "2", "3")

    def test_missing_file_and_bad_rows_are_clear_errors(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="expected a file"):
            load_dataset(f"csv:{tmp_path / 'none.csv'}")
        bad = tmp_path / "bad.csv"
        bad.write_text("1,2,a\n3,x,b\n4,5,a\n")
        with pytest.raises(DatasetError, match="row 2"):
            load_dataset(f"csv:{bad}")


class TestCsvExact:
    """Header detection on the whole first row; labels validated and canonicalized."""

    def test_a_header_of_numeric_names_is_a_header(self, tmp_path: Path) -> None:
        path = tmp_path / "h.csv"
        rows = [f"{i % 5},{i % 7},{i % 3},{i % 2},{i % 2}" for i in range(30)]
        path.write_text("0,1,2,3,label\n" + "\n".join(rows))
        ds = load_dataset(f"csv:{path}")
        assert ds.classes == ("0", "1") and ds.in_shape == (4,)
        assert len(ds.y_train) + len(ds.y_test) == 30

    def test_a_numeric_header_with_string_labels_is_a_header(self, tmp_path: Path) -> None:
        path = tmp_path / "h.csv"
        rows = [f"{i % 5},{i % 7},{'RM'[i % 2]}" for i in range(30)]
        path.write_text("1,2,class\n" + "\n".join(rows))
        assert load_dataset(f"csv:{path}").classes == ("M", "R")

    def test_a_first_data_row_is_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "d.csv"
        path.write_text("\n".join(f"{i % 5},{i % 7},{'RM'[i % 2]}" for i in range(30)))
        ds = load_dataset(f"csv:{path}")
        assert len(ds.y_train) + len(ds.y_test) == 30

    @pytest.mark.parametrize("missing", ["", "NA", "nan", "NaN", " n/a ", "?"])
    def test_missing_labels_are_refused_with_the_row(self, tmp_path: Path, missing: str) -> None:
        path = tmp_path / "m.csv"
        rows = [f"{i},{i % 3},{missing if i == 6 else i % 2}" for i in range(20)]
        path.write_text("a,b,label\n" + "\n".join(rows))
        with pytest.raises(DatasetError, match="row 8 has a missing label"):
            load_dataset(f"csv:{path}")

    def test_numeric_labels_written_differently_are_one_class(self, tmp_path: Path) -> None:
        path = tmp_path / "n.csv"
        spellings = ["1", "1.0", " 1", "0", "0.00", "+0"]
        path.write_text("\n".join(f"{i},{i % 3},{spellings[i % 6]}" for i in range(36)))
        ds = load_dataset(f"csv:{path}")
        assert ds.classes == ("0", "1") and ds.num_classes == 2

    def test_numeric_class_names_as_values(self, tmp_path: Path) -> None:
        path = tmp_path / "n.csv"
        path.write_text("\n".join(f"{i},{i % 3},{[-1, 0.5, 10][i % 3]}" for i in range(30)))
        assert load_dataset(f"csv:{path}").classes == ("-1", "0.5", "10")

    def test_infinite_label_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "n.csv"
        path.write_text("\n".join(f"{i},{i % 3},{'inf' if i == 3 else i % 2}" for i in range(20)))
        with pytest.raises(DatasetError, match="row 4 has a non-finite label"):
            load_dataset(f"csv:{path}")


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=12, max_size=40),
    spellings=st.lists(
        st.sampled_from(["{}", "{}.0", " {}", "{} ", "{}.000"]), min_size=40, max_size=40
    ),
)
def test_numeric_labels_are_one_class_per_value(
    tmp_path_factory: pytest.TempPathFactory, values: list[int], spellings: list[str]
) -> None:
    assume(len(set(values)) >= 2)
    path = tmp_path_factory.mktemp("csv") / "n.csv"
    rows = [f"{i},{i % 3},{spellings[i].format(v)}" for i, v in enumerate(values)]
    path.write_text("\n".join(rows))
    from gyrodrop.experiments.data import _read_csv

    _, y, names = _read_csv(path)
    assert names == tuple(str(v) for v in sorted(set(values)))
    assert [names[c] for c in y.tolist()] == [str(v) for v in values]


class TestDataIdentity:
    def test_changes_with_the_content_not_the_name(self, tmp_path: Path) -> None:
        a, b = tmp_path / "a.csv", tmp_path / "b.csv"
        a.write_text("1,2,0\n3,4,1\n")
        b.write_text("1,2,0\n3,4,1\n")
        assert data_identity(f"csv:{a}") == data_identity(f"csv:{b}")
        b.write_text("1,2,0\n3,5,1\n")
        assert data_identity(f"csv:{a}") != data_identity(f"csv:{b}")
        assert data_identity("digits") is None

    def test_files_of_a_data_dir(self, tmp_path: Path) -> None:
        d = _fashion(tmp_path)
        first = data_identity("fashion-mnist", d)
        assert first is not None and len(first) == 16
        with pytest.raises(DatasetError, match="data_batch_1"):
            data_identity("cifar10", tmp_path / "empty")


class TestStandardize:
    def test_uses_training_statistics_only(self) -> None:
        tr, te = standardize(np.array([[1.0], [3.0]]), np.array([[100.0]]))
        assert tr.flatten().tolist() == [-1.0, 1.0] and te.item() == pytest.approx(98.0)


class TestStratifiedFolds:
    def test_folds_partition_the_data_and_keep_class_balance(self) -> None:
        y = np.array([0] * 30 + [1] * 10 + [2] * 5)
        folds = stratified_folds(y, 5, seed=0)
        assert sorted(np.concatenate(folds).tolist()) == list(range(45))
        for f in folds:
            assert np.bincount(y[f], minlength=3).tolist() == [6, 2, 1]

    def test_too_many_folds_for_the_smallest_class(self) -> None:
        with pytest.raises(ValueError, match="fewer than k=3"):
            stratified_folds(np.array([0, 0, 0, 1, 1]), 3, seed=0)


class TestPaperPreprocessing:
    def test_per_image_standardization_gives_zero_mean_unit_std_per_image(self) -> None:
        x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 255
        z = per_image_standardize(x)
        flat = z.reshape(5, -1)
        assert torch.allclose(flat.mean(1), torch.zeros(5), atol=1e-5)
        assert torch.allclose(flat.std(1, correction=0), torch.ones(5), atol=1e-4)

    def test_constant_image_uses_the_tensorflow_floor(self) -> None:
        x = torch.full((1, 1, 2, 2), 7.0)
        assert per_image_standardize(x).abs().max() == 0
        # std floor 1/sqrt(n): a tiny spread is not blown up
        y = torch.tensor([[0.0, 0.0, 0.0, 0.01]])
        assert float(per_image_standardize(y).abs().max()) < 0.02

    def test_is_invariant_to_a_positive_affine_map(self) -> None:
        x = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(per_image_standardize(x), per_image_standardize(3 * x + 2), atol=1e-5)

    def test_random_crop_flip_shapes_and_content(self) -> None:
        x = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
        out = random_crop_flip(x, 24, torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 24, 24)
        for i in range(2):
            found = False
            for top in range(5):
                for left in range(5):
                    window = x[i, :, top : top + 24, left : left + 24]
                    if torch.equal(out[i], window) or torch.equal(out[i], window.flip(-1)):
                        found = True
            assert found, "every output is a (possibly flipped) window of its input"

    def test_random_crop_flip_is_fixed_by_the_generator_and_flips_about_half(self) -> None:
        x = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        a = random_crop_flip(x, 8, torch.Generator().manual_seed(3))
        b = random_crop_flip(x, 8, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        flipped = sum(not torch.equal(a[i], x[i]) for i in range(400))
        assert 150 < flipped < 250

    def test_center_crop_takes_the_middle(self) -> None:
        x = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
        assert torch.equal(center_crop(x, 24), x[:, :, 2:26, 2:26])
        assert crop_size(28, 28) == 24 and crop_size(32, 32) == 24 and crop_size(8, 8) == 6

    def test_crop_larger_than_the_image_is_a_clear_error(self) -> None:
        with pytest.raises(ValueError, match=r"size must be in \[1, 8\]"):
            center_crop(torch.zeros(1, 1, 8, 8), 9)
        with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\)"):
            random_crop_flip(torch.zeros(8, 8), 4, torch.Generator())

    def test_raw_keeps_pixel_values(self, tmp_path: Path) -> None:
        _fashion(tmp_path)
        ds = load_dataset("fashion-mnist", tmp_path, raw=True)
        assert ds.x_train.dtype == torch.float32
        assert float(ds.x_train.min()) >= 0 and float(ds.x_train.max()) > 1
