"""Study data: the validation split is held out and fixed, training subsets are seeded
and nested, and the test split is used whole."""

from __future__ import annotations

import numpy as np
import pytest

from gyrodrop.experiments.data import DatasetError, load_arrays
from gyrodrop.experiments.study.subsets import load_study_dataset, study_indices


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subsets_are_nested_for_a_seed_and_disjoint_from_validation(seed: int) -> None:
    sizes = (10, 50, 200, 900)
    subsets = [study_indices(1000, n, 100, seed) for n in sizes]
    for (small, val_a), (large, val_b) in zip(subsets, subsets[1:], strict=False):
        assert set(small) <= set(large)
        assert np.array_equal(val_a, val_b)
    train, val = subsets[-1]
    assert len(set(train)) == 900 and set(train).isdisjoint(val)


def test_validation_is_the_same_for_every_seed_and_subsets_differ() -> None:
    a_train, a_val = study_indices(1000, 100, 100, seed=0)
    b_train, b_val = study_indices(1000, 100, 100, seed=1)
    assert np.array_equal(a_val, b_val)
    assert set(a_train) != set(b_train)


def test_sizes_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="is more than the 100 examples"):
        study_indices(100, 60, 50, seed=0)


def test_study_dataset_uses_the_whole_test_split_and_training_statistics() -> None:
    pytest.importorskip("sklearn")
    arrays = load_arrays("digits")
    ds = load_study_dataset("digits", train_size=300, val_size=200, seed=3, arrays=arrays)
    assert len(ds.y_test) == len(arrays[3])
    assert ds.x_val is not None and ds.y_val is not None and len(ds.y_val) == 200
    assert len(ds.y_train) == 300
    mean = ds.x_train.mean(0)
    assert float(mean.abs().max()) < 1e-4  # standardized with the subset's statistics
    train, _ = study_indices(len(arrays[1]), 300, 200, 3)
    assert np.array_equal(ds.y_train.numpy(), arrays[1][train])
    with pytest.raises(DatasetError, match="digits: study_indices"):
        load_study_dataset("digits", train_size=5000, val_size=200, seed=0, arrays=arrays)
