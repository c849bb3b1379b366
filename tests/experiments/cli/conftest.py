"""Fixtures of the command-line tests: tiny runs, a guard that nothing trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gyrodrop.experiments.cli import main, runner

#: The cases' options: one tiny run per method.
TINY = ["--threads", "1", "--quiet", "--epochs", "1", "--seeds", "1", "--limit", "100"]
TINY += ["--batch-size", "32"]


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Methods of the runs trained during the test (training still happens)."""
    calls: list[str] = []
    real = runner.train_run

    def counting(cfg, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(cfg.method)
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "train_run", counting)
    return calls


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if any run starts training."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a run was trained")

    monkeypatch.setattr(runner, "train_run", refuse)


def refused(
    argv: list[str], capsys: pytest.CaptureFixture[str], option: str, *, code: int = 2
) -> str:
    """Runs ``argv``; asserts exit ``code`` and one stderr line naming ``option``, no
    traceback; returns the line."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"gyrodrop {argv[0]}: error: "), lines[0]
    assert option in lines[0], lines[0]
    return lines[0]


def paths(tmp: Path) -> list[str]:
    return ["--db", str(tmp / "r.db"), "--out", str(tmp / "out")]
