"""The study report (placeholder until the statistics land)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gyrodrop.experiments.store import Store


def write_report(
    plan: Any, store: Store, keys: Sequence[str], out: Path, **kw: Any
) -> tuple[str, list[Path]]:
    recs = store.records(keys=keys)
    return f"{len(recs)} runs of plan {plan.name} in the database", []
