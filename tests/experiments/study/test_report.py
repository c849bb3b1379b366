"""The study report on hand-made runs: cells and arms, paired tables with Holm, the
ensemble effect, Table 6 and diversity; no training."""

from __future__ import annotations

from typing import Any

import pytest

from gyrodrop.experiments.study.plan import parse_plan
from gyrodrop.experiments.study.report import arm_label, build_report
from gyrodrop.experiments.study.stats import holm

_PLAN_DATA: dict[str, Any] = {
    "name": "r",
    "dataset": "digits",
    "seeds": 3,
    "val_size": 10,
    "methods": ["dropout", "gyro", "gyro-random"],
    "budget": {"steps": 4, "evaluations": 2},
    "recipe": {"num_subnets": 8, "subnets_per_step": 2},
    "cells": [{"model": "mlp", "sizes": [20]}],
}
PLAN = parse_plan(_PLAN_DATA)


def _run(method: str, seed: int, acc: float, **extra: Any) -> dict[str, Any]:
    r = {
        "model": "mlp",
        "train_size": 20,
        "method": method,
        "seed": seed,
        "num_subnets": None if method == "dropout" else 8,
        "subnets_per_step": None if method == "dropout" else 2,
        "final_acc": acc,
        "test_acc": acc,
        "sel_acc": acc - 0.01,
        "best_acc": acc + 0.01,
        "train_acc": 1.0,
        "gap": 1.0 - acc,
        "test_nll": 1.0 - acc,
        "test_ece": 0.05,
        "wall_seconds": 10.0,
    }
    r.update(extra)
    return r


def test_report_pairs_by_seed_and_holm_corrects_each_table() -> None:
    runs = []
    for seed, (d, g, gr) in enumerate([(0.80, 0.82, 0.81), (0.81, 0.84, 0.80), (0.79, 0.80, 0.78)]):
        runs += [
            _run("dropout", seed, d, mc_acc=d + 0.005, mc_nll=0.1, mc_ece=0.02),
            _run("gyro", seed, g, ens_acc=g + 0.01, ens_nll=0.1, ens_ece=0.01, mc_samples=4),
            _run("gyro-random", seed, gr, diversity_mean=0.5 + seed / 10),
        ]
    text, data = build_report(PLAN, runs)
    final = {e["arm"]: e for e in data["paired"]["final"]}
    assert final["gyro"]["n"] == 3
    assert final["gyro"]["mean_diff"] == pytest.approx((0.02 + 0.03 + 0.01) / 3)
    adjusted = holm([final["gyro"]["p_value"], final["gyro-random"]["p_value"]])
    assert [final["gyro"]["p_holm"], final["gyro-random"]["p_holm"]] == adjusted
    assert data["complete_seeds"] == {"mlp 20": 3}
    assert data["cpu_seconds"] == 90.0
    (t6,) = data["table6"]
    assert t6["mean_diff"] == pytest.approx((-0.01 - 0.04 - 0.02) / 3)
    ens = {e["arm"]: e for e in data["ensemble"]}
    assert ens["gyro: subnetwork ensemble"]["acc"] == pytest.approx([0.83, 0.85, 0.81])
    assert ens["dropout: MC dropout"]["acc_diff"]["mean_diff"] == pytest.approx(0.005)
    assert "dropout: single network" in ens and "acc_diff" not in ens["dropout: single network"]
    assert data["diversity"][0]["diversity_mean"] == pytest.approx([0.5, 0.6, 0.7])
    assert "## Table 6" in text and "## Figure 5" in text and "Holm p" in text


def test_diversity_arms_are_measured_not_compared_again() -> None:
    """A (diversity) arm trains exactly as its method: no second paired test for Holm."""
    runs = []
    for s in range(3):
        runs += [
            _run("dropout", s, 0.80 + s / 100),
            _run("gyro", s, 0.81 + s / 100),
            _run("gyro", s, 0.81 + s / 100, subnetworks=10, diversity_mean=0.5),
        ]
    _, data = build_report(PLAN, runs)
    assert [e["arm"] for e in data["paired"]["final"]] == ["gyro"]
    assert [e["arm"] for e in data["diversity"]] == ["gyro (diversity)"]


def test_arm_labels_name_non_default_sigma_and_diversity() -> None:
    recipe = {"num_subnets": 256, "subnets_per_step": 16}
    assert (
        arm_label({"method": "gyro", "num_subnets": 256, "subnets_per_step": 16}, recipe) == "gyro"
    )
    assert (
        arm_label({"method": "gyro", "num_subnets": 64, "subnets_per_step": 16}, recipe)
        == "gyro σ=64 τ=16"
    )
    assert arm_label({"method": "dropout", "subnetworks": 10}, recipe) == "dropout (diversity)"


def test_the_plot_of_differences_is_written(tmp_path: Any) -> None:
    """One line per method against training-set size (a plan of one size has none)."""
    from gyrodrop.experiments.study.report import _plot

    runs = [
        _run(m, s, 0.8 + 0.01 * s + (m == "gyro") * n / 4000, train_size=n)
        for n in (20, 40)
        for s in range(3)
        for m in ("dropout", "gyro")
    ]
    entries = [
        {**e, "train_size": n}
        for n in (20, 40)
        for e in build_report(PLAN, [r for r in runs if r["train_size"] == n])[1]["paired"]["final"]
    ]
    png = _plot(entries, "dropout", tmp_path / "sub" / "p.png", "r")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert _plot(entries[:1], "dropout", tmp_path / "one.png", "r") is None


def test_pooled_over_sizes_averages_each_seed_then_tests_over_seeds() -> None:
    """By hand: seed s's gyro − dropout is d(20, s) at size 20 and d(40, s) at 40; the
    pooled row tests the per-seed means (d(20, s) + d(40, s)) / 2 over seeds."""
    plan = parse_plan({**_PLAN_DATA, "cells": [{"model": "mlp", "sizes": [20, 40]}]})
    d = {20: [0.010, 0.030, -0.005], 40: [0.000, 0.010, 0.020]}
    runs = []
    for n in (20, 40):
        for s in range(3):
            runs += [
                _run("dropout", s, 0.8, train_size=n),
                _run("gyro", s, 0.8 + d[n][s], train_size=n),
            ]
    runs.append(_run("gyro", 3, 0.9, train_size=20))  # seed 3 lacks size 40: left out
    _, data = build_report(plan, runs)
    (e,) = data["pooled"]
    per_seed = [(d[20][s] + d[40][s]) / 2 for s in range(3)]
    mean = sum(per_seed) / 3
    sd = (sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3**0.5  # t(0.975, 2)
    assert (e["arm"], e["sizes"], e["n"]) == ("gyro", [20, 40], 3)
    assert e["mean_diff"] == pytest.approx(mean)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert e["p_holm"] == e["p_value"]  # one row: Holm changes nothing
