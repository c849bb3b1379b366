"""Machine-readable output: one record per run as JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from gyrodrop.experiments.report.grouping import _CONFIG_FIELDS

__all__ = ["records_json", "records_csv"]


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in rec.items()
        if not isinstance(v, (list, dict)) or k in ("widths", "ood_classes")
    }


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """JSON list, one object per run: configuration and scalar metrics (accuracies as
    fractions in [0, 1])."""
    return json.dumps([_flat(r) for r in records], indent=1, sort_keys=True)


def records_csv(records: Sequence[dict[str, Any]]) -> str:
    """CSV, one row per run, columns: configuration then scalar metrics."""
    flat = [_flat(r) for r in records]
    for r in flat:
        for name in ("widths", "ood_classes"):
            if r.get(name) is not None:
                r[name] = "-".join(str(w) for w in r[name])
    cols: list[str] = [c for c in _CONFIG_FIELDS if any(c in r for r in flat)]
    for r in flat:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()
