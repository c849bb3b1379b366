"""Tests for the gyrodrop command line: every command on tiny data, resumability."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gyrodrop.experiments import cli
from gyrodrop.experiments.cli import main, runner

pytest.importorskip("sklearn")
COMMANDS = ("compare", "sweep", "diversity", "bench", "cv", "report")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small models train faster and steadier on one thread on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _json_report(db: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The issue's bar, first half: one compare --quick run."""
    tmp = tmp_path_factory.mktemp("compare")
    db, out = tmp / "D.db", tmp / "O"
    args = [
        "compare",
        "--quick",
        "--dataset",
        "digits",
        "--methods",
        "none,dropout,gyro",
        "--seeds",
        "2",
        "--db",
        str(db),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return db, out


class TestCompare:
    def test_issue_bar_rerun_trains_nothing_and_report_has_six_records(
        self,
        compared: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        db, out = compared

        def no_training(*a: object, **k: object) -> None:
            raise AssertionError("a finished run was trained again")

        monkeypatch.setattr(runner, "train_run", no_training)
        args = [
            "compare",
            "--quick",
            "--dataset",
            "digits",
            "--methods",
            "none,dropout,gyro",
            "--seeds",
            "2",
            "--db",
            str(db),
            "--out",
            str(out),
        ]
        assert main(args) == 0
        assert "6 of 6 runs already in" in capsys.readouterr().err
        records = _json_report(db, capsys)
        assert len(records) == 6
        assert sorted((r["method"], r["seed"]) for r in records) == sorted(
            (m, s) for m in ("none", "dropout", "gyro") for s in (0, 1)
        )
        for r in records:
            assert r["dataset"] == "digits" and r["model"] == "mlp"
            assert 0.7 < r["test_acc"] <= 1 and 0.7 < r["train_acc"] <= 1
        assert list(out.glob("*.md")) and list(out.glob("*.png"))

    def test_prints_the_markdown_table(
        self, compared: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        db, out = compared
        main(
            [
                "compare",
                "--quick",
                "--methods",
                "none,dropout,gyro",
                "--seeds",
                "2",
                "--db",
                str(db),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        captured = capsys.readouterr()
        assert "| Method |" in captured.out and "| gyro | 0.5 | 16 | 4 | 2 |" in captured.out
        assert captured.err == ""

    def test_interrupt_keeps_finished_runs_and_rerun_resumes(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        real = runner.train_run
        calls: list[str] = []

        def interrupted_second(cfg, *a, **k):  # type: ignore[no-untyped-def]
            calls.append(cfg.method)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(cfg, *a, **k)

        monkeypatch.setattr(runner, "train_run", interrupted_second)
        args = [
            "compare",
            "--quick",
            "--methods",
            "none,gyro",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--db",
            str(tmp_path / "r.db"),
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(args) == 130
        assert "1 of 2 runs are saved" in capsys.readouterr().err
        assert len(_json_report(tmp_path / "r.db", capsys)) == 1
        calls.clear()
        monkeypatch.setattr(runner, "train_run", real)
        assert main(args) == 0
        assert len(_json_report(tmp_path / "r.db", capsys)) == 2

    def test_uncertainty_writes_a_reliability_diagram(self, tmp_path: Path) -> None:
        args = [
            "compare",
            "--quick",
            "--uncertainty",
            "--methods",
            "dropout,gyro",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--db",
            str(tmp_path / "r.db"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
        assert main(args) == 0
        assert (tmp_path / "o" / "compare_digits_mlp_reliability.png").exists()


class TestOtherCommands:
    def test_sweep_grid_table_and_heat_map(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(
                [
                    "sweep",
                    "--quick",
                    "--db",
                    str(tmp_path / "r.db"),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "| σ \\ τ | 2 | 4 |" in out and "Baselines: dropout" in out
        assert (tmp_path / "o" / "sweep_digits_mlp.png").exists()

    def test_diversity_compares_dropout_and_gyro(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(
                [
                    "diversity",
                    "--quick",
                    "--db",
                    str(tmp_path / "r.db"),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "| dropout | 1 |" in out and "| gyro | 1 |" in out and "1.000" in out
        assert (tmp_path / "o" / "diversity_digits_mlp.png").exists()

    def test_cv_reports_mean_over_folds(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        csv_path = tmp_path / "sonar.csv"
        csv_path.write_text(
            "\n".join(f"{i % 7},{(i * 3) % 5},{'R' if i % 2 else 'M'}" for i in range(40))
        )
        args = [
            "cv",
            "--quick",
            "--dataset",
            f"csv:{csv_path}",
            "--db",
            str(tmp_path / "r.db"),
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "3-fold CV" in out and "| dropout | 0.2, input 0.2 |  |  | 3 |" in out
        assert len(_json_report(tmp_path / "r.db", capsys)) == 6

    def test_bench_times_each_method(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(
                [
                    "bench",
                    "--quick",
                    "--methods",
                    "dropout,gyro",
                    "--no-layer",
                    "--db",
                    str(tmp_path / "r.db"),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "| digits | mlp | dropout |" in out and "| digits | mlp | gyro |" in out
        assert (tmp_path / "o" / "bench.md").exists()
        capsys.readouterr()
        args = [
            "report",
            "--db",
            str(tmp_path / "r.db"),
            "--experiment",
            "bench",
            "--format",
            "json",
        ]
        assert main(args) == 0
        timings = json.loads(capsys.readouterr().out)
        assert sorted(t["method"] for t in timings) == ["dropout", "gyro"]
        assert all(t["ms_per_step"] > 0 for t in timings)

    def test_report_renders_every_experiment_and_csv(
        self, compared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        db, _ = compared
        capsys.readouterr()
        assert main(["report", "--db", str(db), "--out", str(tmp_path / "o")]) == 0
        assert "## Method comparison" in capsys.readouterr().out
        assert (tmp_path / "o" / "compare_digits_mlp.png").exists()
        assert main(["report", "--db", str(db), "--format", "csv"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith("experiment,dataset,model,method,seed") and len(lines) == 7


class TestErrors:
    def test_threads_option_is_applied_and_restored(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seen: list[int] = []
        monkeypatch.setitem(
            cli.COMMANDS, "compare", lambda args: seen.append(torch.get_num_threads()) or 0
        )
        before = torch.get_num_threads()
        assert main(["compare", "--threads", "2", "--db", str(tmp_path / "r.db")]) == 0
        assert seen == [2] and torch.get_num_threads() == before

    def test_foreign_db_is_refused_and_untouched(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        db = tmp_path / "thesis.db"
        db.write_text("chapter one")
        assert (
            main(
                [
                    "compare",
                    "--quick",
                    "--db",
                    str(db),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 2
        )
        assert "not an SQLite file" in capsys.readouterr().err
        assert db.read_text() == "chapter one"

    def test_missing_dataset_files_exit_2_with_the_names(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(
                [
                    "compare",
                    "--quick",
                    "--dataset",
                    "cifar10",
                    "--data-dir",
                    str(tmp_path),
                    "--db",
                    str(tmp_path / "r.db"),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            == 2
        )
        assert "data_batch_1" in capsys.readouterr().err

    def test_report_on_missing_db(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["report", "--db", str(tmp_path / "none.db")]) == 2
        assert "no such file" in capsys.readouterr().err

    def test_tau_larger_than_batch(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert (
            main(
                [
                    "compare",
                    "--quick",
                    "--batch-size",
                    "8",
                    "--subnets-per-step",
                    "16",
                    "--num-subnets",
                    "32",
                    "--db",
                    str(tmp_path / "r.db"),
                ]
            )
            == 2
        )
        assert "larger than --batch-size" in capsys.readouterr().err


class TestHelp:
    @pytest.mark.parametrize("command", COMMANDS)
    def test_every_command_help_shows_an_example(
        self, command: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"gyrodrop {command}" in capsys.readouterr().out.split("examples:")[1]

    def test_python_dash_m_gyrodrop(self) -> None:
        res = subprocess.run(
            [sys.executable, "-m", "gyrodrop", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0 and "compare" in res.stdout and "example" in res.stdout

    def test_importing_gyrodrop_does_not_import_plotting_or_rich(self) -> None:
        code = (
            "import sys, gyrodrop, gyrodrop.experiments.cli; "
            "print(any(m.split('.')[0] in ('matplotlib', 'rich', 'sklearn') for m in sys.modules))"
        )
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert res.stdout.strip() == "False", res.stderr


class TestPaperRecipe:
    def test_preset_sets_the_authors_settings_and_explicit_options_win(self) -> None:
        from gyrodrop.experiments.cli import options

        args = options.build_parser().parse_args(["compare", "--recipe", "paper", "--lr", "0.01"])
        v = options.resolve(args, "compare")
        assert v["recipe"] == "paper" and v["model"] == "paper-mlp"
        assert v["optimizer"] == "rmsprop-tf1" and v["momentum"] == 0.9
        assert v["batch_size"] == 256 and v["lr"] == 0.01
        default = options.resolve(options.build_parser().parse_args(["compare"]), "compare")
        assert default["recipe"] == "default" and default["optimizer"] == "rmsprop"

    def test_compare_quick_paper_prints_best_epoch_and_paired_table(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        pytest.importorskip("scipy")
        db = tmp_path / "P.db"
        args = [
            "compare",
            "--quick",
            "--recipe",
            "paper",
            "--dataset",
            "digits",
            "--widths",
            "32,32,32",
            "--methods",
            "dropout,gyro-independent",
            "--epochs",
            "2",
            "--db",
            str(db),
            "--no-plots",
        ]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "Best-epoch test acc (%)" in out and "paper recipe" in out
        assert "Paired by seed against dropout" in out
        assert main(["report", "--db", str(db), "--paired", "dropout", "--format", "json"]) == 0
        paired = json.loads(capsys.readouterr().out)["paired"]
        assert {e["method"] for e in paired} == {"gyro-independent"}
        assert {e["metric"] for e in paired} == {"test_acc", "best_test_acc"}
        assert all(e["n"] == 2 for e in paired)
        runs = _json_report(db, capsys)
        assert {r["recipe"] for r in runs} == {"paper"}
        assert all(0 <= r["best_test_acc"] <= 1 for r in runs)

    def test_width_mult_needs_a_paper_conv_net(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["compare", "--quick", "--width-mult", "0.5", "--no-plots"]) == 2
        assert "--width-mult applies to --model paper-lenet" in capsys.readouterr().err

    def test_report_paired_csv(self, compared: tuple[Path, Path], capsys) -> None:
        pytest.importorskip("scipy")
        db, _ = compared
        capsys.readouterr()
        assert main(["report", "--db", str(db), "--paired", "none", "--format", "csv"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith("experiment,section,method,variant,baseline,metric,n")
        assert len(lines) == 1 + 2 * 2  # dropout and gyro, two metrics each
