"""The data of a study run: a validation split held out of the training split, and
seeded, nested training subsets of the rest, evaluated on the full test split.

For a dataset's training split of ``N`` examples and a ``split_seed``:

- the validation split is the first ``val_size`` examples of a permutation of
  ``range(N)`` drawn from ``split_seed`` (the same for every seed, size and method);
- the training pool is the other ``N - val_size`` examples, in that permutation's order;
- the training subset of ``seed`` and size ``n`` is the first ``n`` examples of the pool
  reordered by a permutation drawn from ``seed``: for one seed every smaller subset lies
  inside every larger one (nested), and every method of that seed sees the same one;
- the test split is used whole.

Features are standardized with the training subset's statistics (per channel for
images), the validation and test splits with the same statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gyrodrop.experiments.data import Dataset, DatasetError, load_arrays, standardize

__all__ = ["study_indices", "load_study_dataset"]


def study_indices(
    n_total: int, train_size: int, val_size: int, seed: int, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, val)`` into a training split of ``n_total`` examples.

    Raises:
        ValueError: ``train_size + val_size`` is more than ``n_total``, or a size < 1.

    Example:
        >>> small, val = study_indices(100, 10, 20, seed=3)
        >>> large, val2 = study_indices(100, 50, 20, seed=3)
        >>> set(small) <= set(large), bool((val == val2).all()), set(large).isdisjoint(val)
        (True, True, True)
    """
    if train_size < 1 or val_size < 1:
        raise ValueError(
            f"study_indices: train_size and val_size must be >= 1, got {train_size}, {val_size}"
        )
    if train_size + val_size > n_total:
        raise ValueError(
            f"study_indices: train_size {train_size} + val_size {val_size} is more than the "
            f"{n_total} examples of the training split"
        )
    split = torch.randperm(n_total, generator=torch.Generator().manual_seed(split_seed))
    val, pool = split[:val_size], split[val_size:]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    train = pool[order[:train_size]]
    return train.numpy(), val.numpy()


def load_study_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_size: int,
    val_size: int,
    seed: int,
    split_seed: int = 0,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]] | None = None,
) -> Dataset:
    """The :class:`Dataset` of one study run (module docstring): ``x_train`` the seeded
    nested subset, ``x_val`` the held-out validation split, ``x_test`` the whole test
    split. ``arrays`` reuses :func:`load_arrays`'s result (loads it when ``None``).

    Raises:
        DatasetError: missing files, or the sizes do not fit the training split.
    """
    xtr, ytr, xte, yte, classes = arrays or load_arrays(name, data_dir, split_seed=split_seed)
    try:
        train, val = study_indices(len(ytr), train_size, val_size, seed, split_seed)
    except ValueError as e:
        raise DatasetError(f"{name}: {e}") from None
    x_train, x_rest = standardize(xtr[train], np.concatenate([xtr[val], xte]))
    num_classes = max(len(classes), int(max(ytr.max(), yte.max())) + 1)
    if len(classes) < num_classes:
        classes = tuple(str(i) for i in range(num_classes))
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(np.array(ytr[train], dtype=np.int64)),
        x_test=x_rest[val_size:],
        y_test=torch.from_numpy(np.array(yte, dtype=np.int64)),
        num_classes=num_classes,
        classes=tuple(classes),
        x_val=x_rest[:val_size],
        y_val=torch.from_numpy(np.array(ytr[val], dtype=np.int64)),
    )
