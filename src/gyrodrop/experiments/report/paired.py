"""Paired statistics: every method against a baseline, run by run (paired by seed).

Runs that differ only in the method share their initial weights, data order and
augmentations (see :mod:`gyrodrop.experiments.train`), so the difference of two
methods is best estimated from per-seed differences: their mean, a 95% Student-t
interval, and the Wilcoxon signed-rank test (two-sided, zero differences dropped).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from gyrodrop.experiments.report.grouping import (
    REPLICATE,
    _variant_label,
    section_label,
    sections,
)
from gyrodrop.experiments.report.tables import markdown

__all__ = [
    "PAIRED_METRICS",
    "paired_differences",
    "paired_summary",
    "paired_stats",
    "paired_table",
    "paired_json",
    "paired_csv",
]

#: Metrics compared by default: accuracy after the last epoch, and the best epoch's
#: (the number the authors' code prints).
PAIRED_METRICS: tuple[str, ...] = ("test_acc", "best_test_acc")
_METRIC_NAMES = {"test_acc": "final", "best_test_acc": "best-epoch"}
_COLUMNS = (
    "experiment",
    "section",
    "method",
    "variant",
    "baseline",
    "metric",
    "n",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
)


def _scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError as e:  # pragma: no cover - scipy is in the experiments extra
        raise RuntimeError(
            'paired statistics need scipy: pip install "gyrodrop[experiments]"'
        ) from e
    return stats


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def paired_summary(diffs: Sequence[float]) -> dict[str, Any]:
    """``n, mean_diff, ci_low, ci_high, p_value`` of paired differences.

    The interval is ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (``None`` for ``n < 2``);
    ``p_value`` is the two-sided Wilcoxon signed-rank p (scipy's default: exact for
    small ``n`` without ties or zeros, zero differences dropped), 1.0 when every
    difference is zero, ``None`` for ``n < 2``.

    Example:
        >>> s = paired_summary([0.01, 0.02, 0.03])
        >>> s["n"], round(s["mean_diff"], 4), round(s["ci_low"], 4), round(s["p_value"], 2)
        (3, 0.02, -0.0048, 0.25)
    """
    n = len(diffs)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": statistics.fmean(diffs) if n else None,
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
    }
    if n < 2:
        return out
    stats = _scipy_stats()
    mean = out["mean_diff"]
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    out["ci_low"], out["ci_high"] = mean - half, mean + half
    if all(d == 0 for d in diffs):
        out["p_value"] = 1.0
    else:
        out["p_value"] = float(stats.wilcoxon(diffs).pvalue)
    return out


def paired_differences(
    runs: Sequence[dict[str, Any]], base_runs: Sequence[dict[str, Any]], metric: str
) -> list[tuple[Any, float]]:
    """``(replicate, run - baseline)`` for every replicate (seed, fold) both have, in
    replicate order; runs without a finite ``metric`` are left out."""
    base = {tuple(r.get(k) for k in REPLICATE): _number(r.get(metric)) for r in base_runs}
    out = []
    for r in runs:
        rep = tuple(r.get(k) for k in REPLICATE)
        a, b = _number(r.get(metric)), base.get(rep)
        if a is not None and b is not None:
            out.append((rep, a - b))
    return sorted(out, key=lambda x: tuple((v is None, v or 0) for v in x[0]))


def paired_stats(
    records: Iterable[dict[str, Any]],
    baseline: str,
    metrics: Sequence[str] = PAIRED_METRICS,
) -> list[dict[str, Any]]:
    """Paired comparison of every variant with ``baseline``, per section and metric.

    Args:
        records: finished runs (:meth:`Store.records`).
        baseline: the method compared against (e.g. ``"dropout"``); in a section with
            several variants of it (say two ``p``), the first in table order.
        metrics: run metrics compared (fractions, like ``test_acc``).

    Returns:
        One dict per (section, variant, metric), in table order: ``method, baseline, n,
        mean_diff, ci_low, ci_high, p_value`` (differences as fractions, method minus
        baseline) and ``experiment, section, variant, metric``. Sections without the
        baseline are left out.
    """
    out = []
    for sec in sections(records):
        ordered = sec.ordered()
        base = next((runs for vkey, runs in ordered if vkey[0] == baseline), None)
        if base is None:
            continue
        for vkey, runs in ordered:
            if runs is base:
                continue
            for metric in metrics:
                diffs = [d for _, d in paired_differences(runs, base, metric)]
                if not diffs:
                    continue
                entry = {
                    "experiment": sec.setting.get("experiment"),
                    "section": section_label(sec),
                    "method": vkey[0],
                    "variant": _variant_label(vkey),
                    "baseline": baseline,
                    "metric": metric,
                }
                entry.update(paired_summary(diffs))
                out.append(entry)
    return out


def _pts(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.2f}"


def _p(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def paired_table(entries: Sequence[dict[str, Any]]) -> str:
    """Markdown: per section, one row per variant, for each metric the mean paired
    difference in points (method minus baseline) with its 95% t interval and the
    Wilcoxon p."""
    if not entries:
        return ""
    parts = []
    by_section: dict[tuple[Any, Any, Any], list[dict[str, Any]]] = {}
    for e in entries:
        by_section.setdefault((e["experiment"], e["section"], e["baseline"]), []).append(e)
    for (_, label, baseline), group in by_section.items():
        metrics = list(dict.fromkeys(e["metric"] for e in group))
        header = ["Method", "n"]
        for m in metrics:
            name = _METRIC_NAMES.get(m, m)
            header += [f"Δ {name} (pts)", "95% CI", "Wilcoxon p"]
        rows = []
        for variant in dict.fromkeys(e["variant"] for e in group):
            cells = {e["metric"]: e for e in group if e["variant"] == variant}
            row: list[Any] = [variant, max(e["n"] for e in cells.values())]
            for m in metrics:
                if m not in cells:
                    row += ["", "", ""]
                    continue
                e = cells[m]
                ci = "" if e["ci_low"] is None else f"[{_pts(e['ci_low'])}, {_pts(e['ci_high'])}]"
                row += [_pts(e["mean_diff"]), ci, _p(e["p_value"])]
            rows.append(row)
        parts.append(
            f"Paired by seed against {baseline} ({label}): mean of per-seed differences, "
            "method minus baseline\n\n" + markdown(header, rows)
        )
    return "\n\n".join(parts)


def paired_json(entries: Sequence[dict[str, Any]]) -> str:
    """``{"paired": [...]}`` (differences as fractions)."""
    return json.dumps({"paired": list(entries)}, indent=1)


def paired_csv(entries: Sequence[dict[str, Any]]) -> str:
    """CSV, one row per entry, columns as :func:`paired_stats` names them."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows([{k: e.get(k) for k in _COLUMNS} for e in entries])
    return buf.getvalue()
