"""Tests for gyrodrop.experiments.report: grouping, tables, exports, plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gyrodrop.experiments import report
from gyrodrop.experiments.train import RunConfig


def _rec(
    method: str,
    seed: int,
    acc: float,
    *,
    experiment: str = "compare",
    sigma: int | None = None,
    tau: int | None = None,
    epochs: int = 5,
    **metrics: Any,
) -> dict[str, Any]:
    cfg = RunConfig(
        experiment,
        "digits",
        "mlp",
        method,
        seed=seed,
        epochs=epochs,
        num_subnets=sigma or 16,
        subnets_per_step=tau or 4,
    ).normalized()
    return {
        "key": cfg.key(),
        **cfg.to_dict(),
        "test_acc": acc,
        "train_acc": min(1.0, acc + 0.05),
        "gap": 0.05,
        "epoch_time": 0.1,
        **metrics,
    }


def _curves(key: str) -> list[dict[str, float]]:
    return [{"epoch": e, "test_acc": 0.5 + 0.1 * e, "train_loss": 1.0 / e} for e in (1, 2, 3)]


class TestSections:
    def test_seeds_average_and_settings_split(self) -> None:
        recs = [_rec("dropout", s, 0.9) for s in range(3)] + [
            _rec("gyro", s, 0.92) for s in range(3)
        ]
        recs.append(_rec("gyro", 0, 0.8, epochs=9))
        secs = report.sections(recs)
        assert len(secs) == 2
        assert sorted(len(r) for r in secs[0].variants.values()) == [3, 3]


class TestCompareTable:
    def test_mean_sd_train_gap_and_method_order(self) -> None:
        recs = [_rec("gyro", 0, 0.90), _rec("gyro", 1, 0.92), _rec("none", 0, 0.8)]
        table = report.compare_table(report.sections(recs)[0])
        lines = table.splitlines()
        assert lines[2].startswith("| none") and lines[3].startswith("| gyro")
        assert "91.00 ± 1.41" in lines[3] and "| 16 | 4 | 2 |" in lines[3]

    def test_uncertainty_columns_appear_only_when_measured(self) -> None:
        plain = report.compare_table(report.sections([_rec("gyro", 0, 0.9)])[0])
        mc = report.compare_table(report.sections([_rec("gyro", 0, 0.9, mc_acc=0.91)])[0])
        assert "MC acc" not in plain and "MC acc" in mc


class TestSweepTable:
    def test_grid_marks_best_and_missing_cells(self) -> None:
        recs = [
            _rec("gyro", 0, 0.9, experiment="sweep", sigma=16, tau=2),
            _rec("gyro", 0, 0.95, experiment="sweep", sigma=16, tau=4),
            _rec("gyro", 0, 0.85, experiment="sweep", sigma=64, tau=2),
            _rec("dropout", 0, 0.88, experiment="sweep"),
        ]
        text = report.sweep_table(report.sections(recs)[0])
        assert "| 16 | 90.00 | **95.00** |" in text
        assert "| 64 | 85.00 | N/A |" in text
        assert "Baselines: dropout 88.00" in text


class TestExports:
    def test_json_is_a_list_of_flat_run_records(self) -> None:
        recs = [_rec("gyro", 0, 0.9, reliability=[[0.5, 0.5, 3]]), _rec("none", 1, 0.8)]
        out = json.loads(report.records_json(recs))
        assert len(out) == 2 and "reliability" not in out[0]
        assert {"dataset", "model", "method", "seed", "test_acc", "train_acc"} <= set(out[0])

    def test_csv_has_one_row_per_run(self) -> None:
        rows = list(
            csv.DictReader(
                io.StringIO(report.records_csv([_rec("gyro", 0, 0.9), _rec("none", 1, 0.8)]))
            )
        )
        assert [r["method"] for r in rows] == ["gyro", "none"] and rows[0]["test_acc"] == "0.9"


class TestPlots:
    def test_every_plot_writes_a_png(self, tmp_path: Path) -> None:
        pytest.importorskip("matplotlib")
        rel = [[0.5, 0.4, 2]] + [[0.0, 0.0, 0]] * 14
        comp = report.sections(
            [_rec("dropout", 0, 0.9, reliability=rel), _rec("gyro", 0, 0.9, reliability=rel)]
        )[0]
        assert report.plot_learning_curves(comp, _curves, tmp_path / "c.png")
        assert report.plot_reliability(comp, tmp_path / "r.png")
        sweep = report.sections(
            [
                _rec("gyro", 0, 0.9, experiment="sweep", sigma=s, tau=t)
                for s in (8, 16)
                for t in (2, 4)
            ]
        )[0]
        assert report.plot_sweep(sweep, tmp_path / "s.png")
        div = report.sections(
            [
                _rec(
                    m,
                    0,
                    0.9,
                    experiment="diversity",
                    diversity_mean=v,
                    diversity_matrix=[[0, v], [v, 0]],
                )
                for m, v in (("dropout", 0.5), ("gyro", 0.6))
            ]
        )[0]
        assert report.plot_diversity(div, tmp_path / "d.png")
        assert "1.200" in report.diversity_table(div)
        for name in ("c", "r", "s", "d"):
            assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    def test_render_experiment_writes_md_and_png_per_section(self, tmp_path: Path) -> None:
        pytest.importorskip("matplotlib")
        recs = [_rec("dropout", 0, 0.9), _rec("gyro", 0, 0.9), _rec("gyro", 0, 0.9, epochs=7)]
        text, files = report.render_experiment("compare", recs, _curves, tmp_path)
        names = sorted(f.name for f in files)
        assert names == [
            "compare_digits_mlp_1.md",
            "compare_digits_mlp_1.png",
            "compare_digits_mlp_2.md",
            "compare_digits_mlp_2.png",
        ]
        assert text.count("### digits / mlp") == 2


class TestPaired:
    """``paired_stats`` against a recomputation from the per-seed records."""

    def _records(self) -> list[dict[str, Any]]:
        base = [0.80, 0.82, 0.81, 0.79, 0.83, 0.80]
        gyro = [0.81, 0.84, 0.81, 0.80, 0.86, 0.79]
        recs = [_rec("dropout", s, a, best_test_acc=a + 0.01) for s, a in enumerate(base)]
        recs += [_rec("gyro", s, a, best_test_acc=a + 0.02) for s, a in enumerate(gyro)]
        recs.append(_rec("none", 0, 0.7, best_test_acc=0.71))  # one seed only
        recs.append(_rec("gyro", 9, 0.99, best_test_acc=0.99))  # no dropout seed 9
        return recs

    def test_matches_a_recomputation_from_per_seed_records(self) -> None:
        stats = pytest.importorskip("scipy.stats")
        recs = self._records()
        entries = report.paired_stats(recs, "dropout")
        by = {(e["method"], e["metric"]): e for e in entries}
        for metric in ("test_acc", "best_test_acc"):
            base = {r["seed"]: r[metric] for r in recs if r["method"] == "dropout"}
            diffs = [
                r[metric] - base[r["seed"]]
                for r in recs
                if r["method"] == "gyro" and r["seed"] in base
            ]
            e = by[("gyro", metric)]
            n = len(diffs)
            mean = sum(diffs) / n
            sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
            half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
            assert e["n"] == 6 and e["baseline"] == "dropout"
            assert e["mean_diff"] == pytest.approx(mean)
            assert (e["ci_low"], e["ci_high"]) == pytest.approx((mean - half, mean + half))
            assert e["p_value"] == pytest.approx(stats.wilcoxon(diffs).pvalue)

    def test_a_single_pair_has_no_interval(self) -> None:
        pytest.importorskip("scipy")
        e = next(
            e
            for e in report.paired_stats(self._records(), "dropout")
            if e["method"] == "none" and e["metric"] == "test_acc"
        )
        assert e["n"] == 1 and e["mean_diff"] == pytest.approx(0.7 - 0.8)
        assert e["ci_low"] is None and e["p_value"] is None

    def test_identical_runs_give_zero_difference_and_p_one(self) -> None:
        pytest.importorskip("scipy")
        s = report.paired_summary([0.0, 0.0, 0.0])
        assert s["mean_diff"] == 0 and s["p_value"] == 1.0 and s["ci_low"] == 0

    def test_json_shape_and_csv_rows(self) -> None:
        pytest.importorskip("scipy")
        entries = report.paired_stats(self._records(), "dropout")
        out = json.loads(report.paired_json(entries))
        assert set(out) == {"paired"}
        keys = {"method", "baseline", "n", "mean_diff", "ci_low", "ci_high", "p_value"}
        assert all(keys <= set(e) for e in out["paired"])
        rows = list(csv.DictReader(io.StringIO(report.paired_csv(entries))))
        assert len(rows) == len(entries) and rows[0]["method"] == entries[0]["method"]

    def test_markdown_shows_both_metrics_in_points(self) -> None:
        pytest.importorskip("scipy")
        text = report.paired_table(report.paired_stats(self._records(), "dropout"))
        assert "Δ final (pts)" in text and "Δ best-epoch (pts)" in text
        assert "| gyro (σ=16, τ=4) | 6 | +1.00 |" in text

    def test_sections_without_the_baseline_are_left_out(self) -> None:
        assert report.paired_stats([_rec("gyro", 0, 0.9)], "dropout") == []

    def test_compare_table_shows_best_epoch_accuracy_when_recorded(self) -> None:
        table = report.compare_table(report.sections(self._records())[0])
        assert "Best-epoch test acc (%)" in table
        plain = report.compare_table(report.sections([_rec("gyro", 0, 0.9)])[0])
        assert "Best-epoch" not in plain
