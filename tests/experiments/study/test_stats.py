"""Study statistics recomputed by hand: Holm's correction, the validation-selected
epoch, and seed pairing."""

from __future__ import annotations

import math

import pytest

from gyrodrop.experiments.study.stats import derive, holm, paired, selected_epoch


def test_holm_matches_a_hand_computation() -> None:
    # sorted: 0.001 (x4 = 0.004), 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.5 (x1 = 0.5)
    assert holm([0.02, 0.5, 0.001, 0.01]) == pytest.approx([0.04, 0.5, 0.004, 0.03])


def test_holm_is_monotone_capped_and_skips_missing() -> None:
    # sorted: 0.03 (x3 = 0.09), 0.04 (x2 = 0.08 -> 0.09 by monotonicity), 0.9 (x1, capped)
    assert holm([0.04, None, 0.03, 0.9]) == pytest.approx([0.09, None, 0.09, 0.9])
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


def test_holm_agrees_with_scipy_free_reference_on_random_inputs() -> None:
    import random

    rng = random.Random(0)
    for _ in range(50):
        p = [rng.random() for _ in range(rng.randint(1, 8))]
        m = len(p)
        order = sorted(range(m), key=lambda i: p[i])
        ref = [0.0] * m
        for k, i in enumerate(order):
            ref[i] = min(1.0, max(min(1.0, (m - j) * p[order[j]]) for j in range(k + 1)))
        assert holm(p) == pytest.approx(ref)


def test_selected_epoch_is_the_first_best_validation_epoch() -> None:
    rows = [
        {"val_acc": 0.70, "test_acc": 0.69},
        {"val_acc": 0.80, "test_acc": 0.75, "train_eval_acc": 0.9},
        {"val_acc": 0.78, "test_acc": 0.81},
        {"val_acc": 0.80, "test_acc": 0.77},
        {"val_acc": math.nan, "test_acc": 0.9},
    ]
    assert selected_epoch(rows) == 1
    d = derive({"test_acc": 0.77, "seed": 0}, rows)
    assert d["sel_acc"] == 0.75 and d["sel_epoch"] == 2
    assert d["sel_gap"] == pytest.approx(0.15)
    assert d["best_acc"] == 0.9 and d["final_acc"] == 0.77
    assert selected_epoch([{"test_acc": 0.5}]) is None


def test_paired_matches_runs_by_seed_and_skips_unpaired() -> None:
    runs = [{"seed": 2, "a": 0.9}, {"seed": 0, "a": 0.8}, {"seed": 5, "a": 0.1}]
    base = [{"seed": 0, "a": 0.7}, {"seed": 2, "a": 0.85}]
    e = paired(runs, base, "a")
    assert e["n"] == 2
    assert e["mean_diff"] == pytest.approx((0.1 + 0.05) / 2)
    half = 12.7062047 * math.sqrt(((0.1 - 0.075) ** 2 + (0.05 - 0.075) ** 2) / 1) / math.sqrt(2)
    assert e["ci_low"] == pytest.approx(0.075 - half, rel=1e-6)
