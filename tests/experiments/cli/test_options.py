"""Every bad option is refused up front: one line naming it, exit 2, nothing trained,
no file written (the cases of the "Experiment command line" list and variants)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gyrodrop.experiments.cli import main

from .conftest import TINY, paths, refused

COMPARE_BAD = [
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--momentum", "-1"], "--momentum"),
    (["--momentum", "1"], "--momentum"),
    (["--methods", "gyro", "--p", "0"], "--p"),
    (["--p", "1"], "--p"),
    (["--p", "nan"], "--p"),
    (["--device", "bogus"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--methods", "blockwise", "--block-size", "0"], "--block-size"),
    (["--methods", "blockwise", "--widths", "16,16"], "--block-size"),
    (["--methods", "gyro", "--num-subnets", "4", "--subnets-per-step", "8"], "--subnets-per-step"),
    (["--methods", ""], "--methods"),
    (["--methods", " , "], "--methods"),
    (["--methods", "gyro,bogus"], "--methods"),
    (["--uncertainty", "--mc-samples", "0"], "--mc-samples"),
    (["--mc-samples", "3"], "--mc-samples"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--seeds", "0"], "--seeds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "1"], "--limit"),
    (["--threads", "0"], "--threads"),
    (["--num-subnets", "0"], "--num-subnets"),
    (["--subnets-per-step", "64", "--num-subnets", "64"], "--subnets-per-step"),
    (["--data-dir", "/nonexistent/gyrodrop"], "--data-dir"),
    (["--dataset", "csv:/nonexistent/gyrodrop.csv"], "--dataset"),
    (["--dataset", "mnist"], "--dataset"),
]


@pytest.mark.usefixtures("no_training")
class TestCompareRefusesBadOptions:
    @pytest.mark.parametrize(("extra", "option"), COMPARE_BAD)
    def test_one_line_exit_2_nothing_trained_nothing_written(
        self, extra: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        refused(["compare", *TINY, *paths(tmp_path), *extra], capsys, option)
        assert not (tmp_path / "r.db").exists() and not (tmp_path / "out").exists()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_cuda_without_cuda(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        refused(["compare", *TINY, *paths(tmp_path), "--device", "cuda"], capsys, "--device")

    def test_message_says_what_is_allowed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        line = refused(["compare", *TINY, *paths(tmp_path), "--lr", "0"], capsys, "--lr")
        assert "> 0" in line
        line = refused(
            ["compare", *TINY, *paths(tmp_path), "--methods", "blockwise", "--widths", "16,16"],
            capsys,
            "--block-size",
        )
        assert "width 16" in line and "--block-size <= " in line


@pytest.mark.usefixtures("no_training")
class TestOtherCommandsRefuseBadOptions:
    @pytest.mark.parametrize(
        ("argv", "option"),
        [
            (["bench", "--steps", "0"], "--steps"),
            (["bench", "--warmup", "-1"], "--warmup"),
            (["bench", "--layer-features", "8", "--block-size", "32"], "--layer-features"),
            (["cv", "--max-norm", "-1"], "--max-norm"),
            (["cv", "--max-norm", "nan"], "--max-norm"),
            (["cv", "--folds", "1"], "--folds"),
            (["cv", "--input-p", "1.5"], "--input-p"),
            (["cv", "--input-p", "0.2", "--model", "lenet"], "--input-p"),
            (["sweep", "--num-subnets", "2", "--subnets-per-step", "4,8"], "--subnets-per-step"),
            (["sweep", "--methods", ""], "--methods"),
            (["diversity", "--subnetworks", "1"], "--subnetworks"),
            (["diversity", "--eval-size", "0"], "--eval-size"),
            (
                ["diversity", "--subnetworks", "20", "--num-subnets", "16"],
                "--subnetworks",
            ),
            (["diversity", "--model", "resnet18"], "--model"),
        ],
    )
    def test_one_line_exit_2(
        self, argv: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        refused([argv[0], *TINY, *paths(tmp_path), *argv[1:]], capsys, option)
        assert not (tmp_path / "r.db").exists() and not (tmp_path / "out").exists()

    def test_diversity_eval_size_larger_than_the_test_split(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        line = refused(
            ["diversity", *TINY, *paths(tmp_path), "--eval-size", "500"], capsys, "--eval-size"
        )
        assert "100 test examples" in line

    def test_diversity_of_a_one_step_run_is_refused_before_training(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        argv = ["diversity", *TINY, *paths(tmp_path), "--limit", "20", "--subnetworks", "20"]
        line = refused(argv, capsys, "--subnetworks")
        assert "only 16 distinct" in line  # one step: tau = 16 row groups


@pytest.mark.usefixtures("no_training")
class TestOutputPaths:
    def test_out_naming_an_existing_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "f").write_text("keep")
        argv = ["compare", *TINY, "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "f")]
        refused(argv, capsys, "--out")
        assert (tmp_path / "f").read_text() == "keep" and not (tmp_path / "r.db").exists()

    def test_db_that_is_a_directory_or_under_a_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "f").write_text("keep")
        for db in (tmp_path, tmp_path / "f" / "r.db"):
            argv = ["compare", *TINY, "--db", str(db), "--out", str(tmp_path / "o")]
            refused(argv, capsys, "--db")

    @pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"
    )
    def test_out_in_a_read_only_folder(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            argv = ["compare", *TINY, "--db", str(tmp_path / "r.db"), "--out", str(ro / "o")]
            refused(argv, capsys, "--out")
        finally:
            ro.chmod(0o755)

    @pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
    @pytest.mark.parametrize("option", ["--out", "--db"])
    def test_a_folder_nobody_can_write_even_root(
        self, option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        where = {"--out": str(tmp_path / "o"), "--db": str(tmp_path / "r.db")}
        where[option] = "/proc/gyrodrop-test/x"
        argv = ["compare", *TINY, "--db", where["--db"], "--out", where["--out"]]
        line = refused(argv, capsys, option)
        assert "cannot write" in line or "not a directory" in line

    @pytest.mark.parametrize(
        "command", ["compare", "sweep", "diversity", "cv", "bench", "report", "study", "study-dry"]
    )
    @pytest.mark.parametrize("option", ["--db", "--out"])
    @pytest.mark.parametrize("value", ["", "  "])
    def test_an_empty_path_is_refused_before_anything_is_written(
        self,
        command: str,
        option: str,
        value: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Path("") is the current folder: an empty --out wrote its tables there
        monkeypatch.chdir(tmp_path)
        where = {"--db": str(tmp_path / "r.db"), "--out": str(tmp_path / "o"), option: value}
        argv = [command, "--db", where["--db"], "--out", where["--out"]]
        if command.startswith("study"):
            argv[:1] = ["study", "tiny", *(["--dry-run"] if command == "study-dry" else [])]
        elif command != "report":
            argv[1:1] = TINY
        line = refused(argv, capsys, f"{option} is empty")
        assert line.startswith(f"gyrodrop {argv[0]}: error: {option} is empty")
        assert line.endswith(("pass a results file path", "pass a folder for tables and plots"))
        assert list(tmp_path.iterdir()) == []

    def test_report_out_naming_a_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "f").write_text("keep")
        refused(
            ["report", "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "f")],
            capsys,
            "--out",
        )


class TestDeeperErrors:
    def test_data_error_is_one_line_and_debug_shows_the_traceback(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        csv = tmp_path / "d.csv"
        csv.write_text("".join(f"{i},{i % 3},{'NA' if i == 4 else i % 2}\n" for i in range(30)))
        argv = ["compare", *TINY, *paths(tmp_path), "--dataset", f"csv:{csv}"]
        line = refused(argv, capsys, "row 5")
        assert "missing label" in line
        assert main([*argv, "--debug"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1] == line

    def test_an_unexpected_error_is_one_line_exit_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from gyrodrop.experiments.cli import runner

        def boom(*a: object, **k: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(runner, "train_run", boom)
        argv = ["compare", *TINY, *paths(tmp_path), "--methods", "none"]
        line = refused(argv, capsys, "RuntimeError: boom", code=1)
        assert "--debug" in line


class TestNothingSilentlyDropped:
    def test_sweep_notes_the_cells_it_leaves_out(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: list[str]
    ) -> None:
        argv = ["sweep", *TINY, *paths(tmp_path), "--baselines", "", "--num-subnets", "2,4"]
        argv = [a for a in argv if a != "--quiet"] + ["--subnets-per-step", "4"]
        assert main(argv) == 0
        assert "sigma 2 tau 4" in capsys.readouterr().err
        assert trained == ["gyro"]
