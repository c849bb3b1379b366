"""The README's study tables are recomputed from the committed database: every table row
of the README's results section that names a study cell appears, character for
character, in the report :func:`write_report` builds from ``docs/results/study.db``.

The run keys carry the content hash of the data files (``data_id``); the test takes it
from the database's own runs, so it needs no Fashion-MNIST files and trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from pathlib import Path

import pytest

from gyrodrop.experiments.store import Store
from gyrodrop.experiments.study.plan import BUILTIN, expand, load_plan
from gyrodrop.experiments.study.report import write_report

ROOT = Path(__file__).resolve().parents[3]
DB = ROOT / "docs" / "results" / "study.db"
README = ROOT / "README.md"


def _results_section() -> str:
    text = README.read_text()
    start = text.index("## Results: when does gyro dropout help?")
    return text[start : text.index("### Other budgets", start)]


def _reports(tmp_path: Path) -> str:
    with sqlite3.connect(f"file:{DB}?mode=ro", uri=True) as con:
        (config,) = con.execute("select config from runs where experiment = 'study'").fetchone()
    data_id = json.loads(config)["data_id"]
    out = []
    with Store(str(DB), readonly=True) as store:
        for name in BUILTIN:
            plan = load_plan(name)
            if plan.dataset != "fashion-mnist":
                continue
            keys = [dataclasses.replace(c, data_id=data_id).key() for c in expand(plan)]
            text, _ = write_report(plan, store, keys, tmp_path / name, plots=False)
            out.append(text)
    return "\n".join(out)


@pytest.mark.skipif(not DB.exists(), reason="no committed study database")
def test_every_study_row_of_the_readme_is_in_a_report_of_the_committed_database(
    tmp_path: Path,
) -> None:
    reports = set(_reports(tmp_path).splitlines())
    rows = [r for r in _results_section().splitlines() if re.match(r"\| (mlp2|lenet) \|", r)]
    assert len(rows) >= 20
    missing = [r for r in rows if r not in reports]
    assert not missing, f"{len(missing)} README rows not in the reports, e.g. {missing[0]}"
