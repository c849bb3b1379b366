"""Command-line faults found by trying gyrodrop as a newcomer (variants of the
"Experiment command line" cases of issue 11). An ``xfail(strict=True)`` test is a fault
still open; its reason says what happens instead."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from gyrodrop.experiments.cli import main

from .conftest import TINY, paths, refused


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("cmd", ["compare", "sweep"])
def test_blockwise_p_that_drops_no_block_is_refused(
    cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # p=0.01 drops round(0.01 * 8) = 0 of the 8 blocks of 32 of width 256: a run
    # reported as "blockwise, p 0.01" would be a run without dropout.
    extra = ["--methods", "blockwise", "--p", "0.01"]
    if cmd == "sweep":
        extra += ["--num-subnets", "16", "--subnets-per-step", "2", "--baselines", "none"]
    refused([cmd, *TINY, *paths(tmp_path), *extra], capsys, "--p")


@pytest.mark.usefixtures("no_training")
def test_cv_blockwise_input_dropout_that_drops_no_block_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --p 0.5 drops hidden blocks; the input dropout (0.2 of 1 block of 32) drops none
    argv = ["cv", *TINY, *paths(tmp_path), "--methods", "blockwise", "--p", "0.5"]
    argv += ["--widths", "64,64"]
    refused(argv, capsys, "--input-p")


@pytest.mark.usefixtures("no_training")
def test_uncertainty_without_a_dropout_method_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compare", *TINY, *paths(tmp_path), "--methods", "none", "--uncertainty"]
    refused(argv, capsys, "--uncertainty")


@pytest.mark.usefixtures("no_training")
def test_gyro_options_without_a_gyro_method_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--methods", "dropout", "--num-subnets", "4", "--subnets-per-step", "8"]
    refused(["compare", *TINY, *paths(tmp_path), *extra], capsys, "--num-subnets")


def test_compare_refuses_a_results_file_with_a_malformed_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, out = tmp_path / "r.db", str(tmp_path / "out")
    assert main(["compare", *TINY, "--db", str(db), "--out", out, "--methods", "none"]) == 0
    data = bytearray(db.read_bytes())
    i = data.find(b'"test_acc')
    assert i > 0
    data[i : i + 9] = b"\x00\x01{{{{[[["
    db.write_bytes(bytes(data))
    damaged = tmp_path / "damaged.db"
    shutil.copy(db, damaged)
    before = hashlib.sha256(damaged.read_bytes()).hexdigest()
    refused(["report", "--db", str(damaged), "--out", out, "--quiet"], capsys, "damaged.db")
    argv = ["compare", *TINY, "--db", str(damaged), "--out", out, "--methods", "dropout"]
    refused(argv, capsys, "damaged.db")
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == before
