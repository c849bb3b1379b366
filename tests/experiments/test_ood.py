"""compare --uncertainty --ood-classes: the OOD split, the deep ensemble's members, the
evaluators a run stores, the report, and one exit-2 line per bad option."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gyrodrop.experiments.cli import main
from gyrodrop.experiments.data import Dataset, load_dataset
from gyrodrop.experiments.ood import EVALUATORS, METRICS, member_seed, split_ood, uncertainty_run
from gyrodrop.experiments.train import RunConfig, train_run

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def toy(n_train=40, n_test=30, classes=4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        "toy",
        torch.randn(n_train, 3, generator=g) * 5 + 2,
        torch.arange(n_train) % classes,
        torch.randn(n_test, 3, generator=g),
        torch.arange(n_test) % classes,
        classes,
        tuple("abcd"[:classes]),
    )


class TestSplitOod:
    def test_held_out_classes_leave_training_and_form_the_ood_set(self):
        ds = toy()
        ind, x_ood = split_ood(ds, (1, 3), None, 0)
        assert ind.num_classes == 2 and ind.classes == ("a", "c")
        assert set(ind.y_train.tolist()) == {0, 1} and set(ind.y_test.tolist()) == {0, 1}
        assert len(ind.y_train) == 20 and len(ind.y_test) == 15 and len(x_ood) == 15
        # relabelled: old class 2 is new class 1, in the same rows
        old = ds.y_test[(ds.y_test == 0) | (ds.y_test == 2)]
        assert torch.equal(ind.y_test, (old == 2).long())

    def test_standardized_on_the_kept_training_examples(self):
        ind, _ = split_ood(toy(), (3,), None, 0)
        assert abs(float(ind.x_train.mean())) < 1e-5
        assert float(ind.x_train.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
        raw, _ = split_ood(toy(), (3,), None, 0, restandardize=False)
        assert float(raw.x_train.mean()) > 1.0

    def test_train_limit_is_a_seeded_subset_and_the_tests_stay_whole(self):
        a, _ = split_ood(toy(), (3,), 7, 0, restandardize=False)
        b, _ = split_ood(toy(), (3,), 7, 0, restandardize=False)
        c, _ = split_ood(toy(), (3,), 7, 1, restandardize=False)
        assert len(a.y_train) == 7 and torch.equal(a.x_train, b.x_train)
        assert not torch.equal(a.x_train, c.x_train)
        assert len(a.y_test) == len(toy().y_test[toy().y_test != 3])

    @pytest.mark.parametrize(
        ("classes", "match"),
        [
            ((4,), r"class indices in \[0, 4\) of toy, got \[4\]"),
            ((0, 1, 2), "leaves 1 of the 4 classes"),
        ],
    )
    def test_bad_classes_are_refused(self, classes, match):
        with pytest.raises(ValueError, match=match):
            split_ood(toy(), classes, None, 0)

    def test_an_empty_ood_set_is_refused(self):
        ds = toy()
        ds = Dataset(
            ds.name, ds.x_train, ds.y_train, ds.x_test[:2], torch.tensor([0, 1]), 4, ds.classes
        )
        with pytest.raises(ValueError, match="the OOD set is empty"):
            split_ood(ds, (3,), None, 0)


def config(method="gyro", ensemble=2, **kw) -> RunConfig:
    base = {
        "experiment": "compare",
        "dataset": "digits",
        "model": "mlp",
        "method": method,
        "seed": 1,
        "epochs": 2,
        "batch_size": 64,
        "limit": 300,
        "num_subnets": 8,
        "subnets_per_step": 2,
        "mc_samples": 4,
        "ood_classes": (5, 6, 7, 8, 9),
        "ensemble_size": ensemble,
    }
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", limit=300)


class TestUncertaintyRun:
    def test_member_seeds_are_distinct_and_member_0_is_the_run(self):
        seeds = {member_seed(s, j) for s in range(10) for j in range(5)}
        assert len(seeds) == 50 and member_seed(3, 0) == 3

    def test_gyro_stores_every_evaluator_score_and_metric(self, digits):
        m = uncertainty_run(config(), digits).metrics
        for key, _, scores in EVALUATORS:
            for score in scores:
                for name in METRICS:
                    value = m[f"unc_{key}_{score}_{name}"]
                    assert math.isfinite(value), (key, score, name)
                assert len(m[f"rc_{key}_{score}"]) <= 50
            assert len(m[f"reliability_unc_{key}"]) == 15
        assert m["ensemble_size"] == 2 and m["n_ood"] > 0
        assert m["mc_acc"] == m["unc_mc_entropy_accuracy"]

    def test_member_0_trains_as_the_plain_run_on_the_same_split(self, digits):
        cfg = config(ensemble=1)
        got = uncertainty_run(cfg, digits).metrics
        ind, _ = split_ood(digits, cfg.ood_classes, None, cfg.split_seed)
        plain = train_run(
            RunConfig(
                **{
                    **cfg.to_dict(),
                    "ood_classes": None,
                    "ensemble_size": None,
                    "mc_samples": None,
                    "widths": None,
                }
            ),
            ind,
        ).metrics
        assert got["test_acc"] == plain["test_acc"] == got["unc_single_max_prob_accuracy"]
        assert not any(k.startswith("unc_deep") for k in got)

    def test_no_dropout_has_only_the_single_network_and_the_deep_ensemble(self, digits):
        m = uncertainty_run(config(method="none"), digits).metrics
        assert "unc_single_max_prob_nll" in m and "unc_deep_entropy_nll" in m
        assert not any(k.startswith(("unc_mc", "unc_ens")) for k in m)

    def test_dropout_has_mc_but_no_subnetwork_ensemble(self, digits):
        m = uncertainty_run(config(method="dropout", ensemble=1), digits).metrics
        assert "unc_mc_mutual_info_ood_auroc" in m
        assert not any(k.startswith("unc_ens") for k in m)


def run_cli(tmp: Path, *extra: str) -> int:
    return main(
        [
            "compare",
            "--quick",
            "--seeds",
            "2",
            "--epochs",
            "2",
            "--db",
            str(tmp / "r.db"),
            "--out",
            str(tmp / "o"),
            "--quiet",
            *extra,
        ]
    )


class TestCommandLine:
    def test_report_tables_plot_and_json(self, tmp_path, capsys):
        args = ("--uncertainty", "--ood-classes", "5,6,7,8,9", "--ensemble-size", "2")
        assert run_cli(tmp_path, "--methods", "dropout,gyro", *args) == 0
        out = capsys.readouterr().out
        assert "#### Uncertainty" in out and "gyro subnetwork ensemble" in out
        assert "deep ensemble x2" in out and "row minus dropout's MC dropout by the same" in out
        assert (tmp_path / "o" / "compare_digits_mlp_uncertainty.png").exists()
        assert main(["report", "--db", str(tmp_path / "r.db"), "--format", "json"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert len(records) == 4
        assert all(r["ood_classes"] == [5, 6, 7, 8, 9] for r in records)
        assert all("unc_deep_entropy_ood_auroc" in r for r in records)
        # rerun: nothing trains again
        assert run_cli(tmp_path, "--methods", "dropout,gyro", *args) == 0

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--ood-classes", "5,6"], "--ood-classes needs --uncertainty"),
            (["--ensemble-size", "3"], "--ensemble-size need(s) --ood-classes"),
            (["--uncertainty", "--train-limit", "100"], "--train-limit need(s) --ood-classes"),
            (
                ["--uncertainty", "--ood-classes", "5", "--ensemble-size", "0"],
                "--ensemble-size must be an integer >= 1",
            ),
            (
                ["--uncertainty", "--ood-classes", "5", "--train-limit", "1"],
                "--train-limit must be an integer >= 2",
            ),
            (
                ["--uncertainty", "--ood-classes", "10"],
                r"class indices in [0, 10) of digits, got [10]",
            ),
            (["--uncertainty", "--ood-classes", "0,1,2,3,4,5,6,7,8"], "leaves 1 of the 10 classes"),
            (["--uncertainty", "--ood-classes", "5,5"], "distinct class indices"),
        ],
    )
    def test_bad_options_exit_2_with_one_line(self, tmp_path, capsys, extra, message):
        assert run_cli(tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


class TestReport:
    def records(self):
        from gyrodrop.experiments.report.grouping import sections

        base = {
            "experiment": "compare",
            "dataset": "d",
            "model": "mlp",
            "epochs": 1,
            "batch_size": 8,
            "lr": 0.1,
            "optimizer": "sgd",
            "ood_classes": [1],
            "ensemble_size": 2,
        }
        recs = []
        for seed, (nll_mc, nll_ens) in enumerate([(0.50, 0.40), (0.70, 0.50), (0.60, 0.60)]):
            common = dict.fromkeys(METRICS, 0.5)
            recs.append(
                {**base, "method": "dropout", "seed": seed}
                | {f"unc_mc_entropy_{m}": v for m, v in common.items()}
                | {"unc_mc_entropy_nll": nll_mc}
            )
            recs.append(
                {**base, "method": "gyro", "num_subnets": 8, "subnets_per_step": 2, "seed": seed}
                | {f"unc_ens_entropy_{m}": v for m, v in common.items()}
                | {"unc_ens_entropy_nll": nll_ens}
            )
        return sections(recs)[0]

    def test_paired_differences_by_seed_with_a_t_interval(self):
        from scipy import stats

        from gyrodrop.experiments.report.uncertainty import uncertainty_paired_table

        text = uncertainty_paired_table(self.records())
        diffs = [-0.1, -0.2, 0.0]
        half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / math.sqrt(3)
        want = f"{-0.1:+.3f} [{-0.1 - half:+.3f}, {-0.1 + half:+.3f}]"
        row = next(line for line in text.splitlines() if line.startswith("| gyro"))
        assert want in row and "| 3 |" in row
        assert "row minus dropout's MC dropout by the same score" in text

    def test_table_gives_the_mean_and_the_interval_half_width(self):
        from gyrodrop.experiments.report.uncertainty import uncertainty_table

        text = uncertainty_table(self.records())
        row = next(line for line in text.splitlines() if line.startswith("| dropout"))
        assert "| 50.00 ± 0.00 |" in row and "| 0.600 ± 0.248 |" in row
