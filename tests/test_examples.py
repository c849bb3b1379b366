"""Every script in ``examples/`` runs with ``--quick`` and documents its exact command.

The examples are found by globbing, so a new example is tested without touching this
file; ``make examples`` runs only this file. Examples load scikit-learn's digits, so
they need the ``[experiments]`` extra.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the examples need the [experiments] extra")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))

# Examples that must be started by a launcher rather than by `python script.py`.
LAUNCHERS = {
    "ddp_train.py": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


class TestExamplesRun:
    @pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
    def test_example_runs_quick_without_error(self, path: Path, tmp_path: Path) -> None:
        cmd = [sys.executable, *LAUNCHERS.get(path.name, []), str(path), "--quick"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        result = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (
            f"{' '.join(cmd)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )


class TestExampleDocstrings:
    @pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
    def test_docstring_gives_the_quick_command(self, path: Path) -> None:
        doc = _docstring(path)
        command = f"examples/{path.name} --quick"
        assert command in doc, f"{path.name}: the usage docstring should show `... {command}`"

    def test_examples_directory_is_not_empty(self) -> None:
        assert len(EXAMPLES) >= 4
