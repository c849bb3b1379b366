"""``gyrodrop study``: a tiny plan end to end, resumption without duplicates, the dry
run, and bad plans refused in one line (exit 2) before anything trains."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gyrodrop.experiments.cli import main, runner

pytest.importorskip("sklearn")

PLAN = """
name = "mini"
dataset = "digits"
seeds = 2
val_size = 100
methods = ["none", "dropout", "gyro"]
[budget]
steps = 6
evaluations = 2
[recipe]
batch_size = 32
lr = 0.003
lr_schedule = "cosine"
num_subnets = 4
subnets_per_step = 2
mc_samples = 2
ens_subnets = 2
[[cells]]
model = "mlp"
sizes = [60, 120]
"""
RUNS = 2 * 2 * 3


def _plan(tmp_path: Path, text: str = PLAN) -> str:
    path = tmp_path / "mini.toml"
    path.write_text(text)
    return str(path)


def _rows(db: Path) -> tuple[int, int, int]:
    con = sqlite3.connect(db)
    try:
        runs = con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone()
        claims = con.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    finally:
        con.close()
    return int(runs[0]), int(runs[1]), int(claims)


def test_a_study_trains_every_run_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, out = tmp_path / "s.db", tmp_path / "out"
    args = ["study", _plan(tmp_path), "--db", str(db), "--out", str(out), "--quiet"]
    assert main([*args, "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "## Paired against dropout: final test accuracy (primary)" in text
    assert "Holm p" in text and "## The ensemble effect" in text
    assert _rows(db) == (RUNS, RUNS, 0)
    data = json.loads((out / "mini.json").read_text())
    assert data["complete_seeds"] == {"mlp 60": 2, "mlp 120": 2}
    assert {e["arm"] for e in data["paired"]["final"]} == {"none", "gyro"}
    assert (out / "mini.md").read_text().startswith("# Study mini")
    # --report recomputes the same numbers from the database alone
    assert main([*args, "--report", "--no-plots"]) == 0
    assert json.loads((out / "mini.json").read_text())["paired"] == data["paired"]


def test_an_interrupted_study_resumes_without_training_a_run_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = runner.train_run
    trained: list[tuple[str, int, int | None]] = []

    def stop_at_fifth(cfg, *a, **k):  # type: ignore[no-untyped-def]
        if len(trained) == 4:
            raise KeyboardInterrupt
        trained.append((cfg.method, cfg.seed, cfg.train_size))
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "train_run", stop_at_fifth)
    db = tmp_path / "s.db"
    args = ["study", _plan(tmp_path), "--db", str(db), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 130
    assert f"4 of {RUNS} runs are saved" in capsys.readouterr().err
    assert _rows(db) == (4, 4, 0)
    assert [t[1] for t in trained] == [0, 0, 0, 0]  # seed-major: seed 0 first

    def counting(cfg, *a, **k):  # type: ignore[no-untyped-def]
        trained.append((cfg.method, cfg.seed, cfg.train_size))
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "train_run", counting)
    assert main(args) == 0
    assert _rows(db) == (RUNS, RUNS, 0)
    assert len(trained) == RUNS and len(set(trained)) == RUNS  # nothing trained twice
    assert main(args) == 0  # a third time: nothing left
    assert len(trained) == RUNS


def test_dry_run_prints_the_plan_and_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    db = tmp_path / "none.db"
    assert main(["study", "data-ladder", "--db", str(db), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "runs: 300 (0 already in" in out and "estimated time:" in out
    assert "mlp2: sizes [1000, 2000, 5000, 10000]" in out
    assert not db.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("seeds = 2", "seeds = 0"), "seeds: must be a positive integer, got 0"),
        (('"gyro"]', '"gyro", "zoneout"]'), "unknown method 'zoneout'"),
        (('model = "mlp"', 'model = "vgg"'), "unknown model 'vgg'"),
        (("steps = 6", "steps = -6"), "budget.steps: must be a positive integer"),
        (("sizes = [60, 120]", "sizes = [60, 5000]"), "the largest size allowed is"),
    ],
)
def test_bad_plans_exit_2_with_one_line_before_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    plan = _plan(tmp_path, PLAN.replace(*change))
    assert main(["study", plan, "--db", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gyrodrop study: error: ") and message in err
    assert err.count("\n") == 1


def test_unknown_plan_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "no-such-plan", "--dry-run"]) == 2
    assert (
        "not a built-in plan (data-ladder, overfit-ablations, full-data, tiny)"
        in capsys.readouterr().err
    )
