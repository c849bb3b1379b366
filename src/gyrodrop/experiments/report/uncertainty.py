"""The uncertainty report of ``compare --uncertainty --ood-classes``: per method and
evaluator (single network, MC dropout, gyro subnetwork ensemble, deep ensemble) and
score, every metric of :func:`gyrodrop.uncertainty_metrics` with its 95% t interval
over seeds, the paired differences to a baseline row (by seed), and one figure of
reliability diagrams and risk-coverage curves (:mod:`gyrodrop.experiments.ood`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gyrodrop.experiments.ood import EVALUATORS, METRICS
from gyrodrop.experiments.report.grouping import Section, _variant_label, section_label
from gyrodrop.experiments.report.paired import paired_summary
from gyrodrop.experiments.report.tables import markdown

__all__ = [
    "has_uncertainty",
    "uncertainty_rows",
    "uncertainty_table",
    "uncertainty_paired_table",
    "plot_uncertainty",
]

_SCORE_NAMES = {"max_prob": "max prob", "entropy": "entropy", "mutual_info": "mutual info"}
_HEADER = ("accuracy %", "NLL", "Brier", "ECE", "AURC", "AUROC", "AUPR", "FPR95")
#: Metrics of the paired table (lower is better except AUROC / AUPR / accuracy).
PAIRED: tuple[str, ...] = ("nll", "ece", "aurc", "ood_auroc", "ood_fpr95")

Row = tuple[tuple[Any, ...], str, str, str, list[dict[str, Any]]]


def has_uncertainty(sec: Section) -> bool:
    return any(k.startswith("unc_") for r in sec.records for k in r)


def uncertainty_rows(sec: Section) -> list[Row]:
    """``(variant, evaluator, evaluator label, score, runs)`` for every evaluator and
    score some run of the variant measured."""
    out: list[Row] = []
    for vkey, runs in sec.ordered():
        for key, label, scores in EVALUATORS:
            for score in scores:
                if any(f"unc_{key}_{score}_accuracy" in r for r in runs):
                    if key == "deep":
                        sizes = {r.get("ensemble_size") for r in runs}
                        label = f"deep ensemble x{max(s or 0 for s in sizes)}"
                    out.append((vkey, key, label, score, runs))
    return out


def _cell(values: Sequence[float], name: str) -> str:
    if not values:
        return ""
    scale = 100.0 if name == "accuracy" else 1.0
    digits = 2 if name == "accuracy" else 3
    s = paired_summary(list(values))
    mean = scale * s["mean_diff"]
    if s["ci_low"] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * (s['ci_high'] - s['mean_diff']):.{digits}f}"


def _values(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]


def uncertainty_table(sec: Section) -> str:
    """Every metric per method x evaluator x score: mean ± the half-width of the 95% t
    interval over seeds (accuracy in %)."""
    rows = []
    for vkey, key, label, score, runs in uncertainty_rows(sec):
        cells = [_cell(_values(runs, f"unc_{key}_{score}_{m}"), m) for m in METRICS]
        n = len(_values(runs, f"unc_{key}_{score}_accuracy"))
        rows.append([_variant_label(vkey), label, _SCORE_NAMES[score], n, *cells])
    return markdown(["method", "evaluator", "score", "n", *_HEADER], rows)


def _baseline(rows: Sequence[Row], score: str) -> Row | None:
    """Dropout's MC dropout by ``score`` (by entropy for ``max_prob``)."""
    want = "entropy" if score == "max_prob" else score
    for row in rows:
        if row[0][0] == "dropout" and row[1] == "mc" and row[3] == want:
            return row
    return None


def uncertainty_paired_table(sec: Section) -> str:
    """Per row, the mean difference to dropout's MC dropout by the same score (by
    entropy for the single network's max prob), paired by seed, with its 95% t
    interval; empty without a dropout run."""
    rows = uncertainty_rows(sec)
    if _baseline(rows, "entropy") is None:
        return ""
    out = []
    for row in rows:
        base = _baseline(rows, row[3])
        if base is None or row is base:
            continue
        cells = []
        n = 0
        for m in PAIRED:
            diffs = _diffs(row, base, m)
            n = max(n, len(diffs))
            cells.append(_interval(diffs))
        out.append([_variant_label(row[0]), row[2], _SCORE_NAMES[row[3]], n, *cells])
    title = (
        "Paired by seed: row minus dropout's MC dropout by the same score (the single "
        "network's max prob: minus MC dropout by entropy), mean [95% t interval]; lower "
        "is better for NLL, ECE, AURC and FPR95, higher for AUROC."
    )
    header = ["method", "evaluator", "score", "n", "ΔNLL", "ΔECE", "ΔAURC", "ΔAUROC", "ΔFPR95"]
    return title + "\n\n" + markdown(header, out)


def _diffs(row: Row, base: Row, metric: str) -> list[float]:
    """Per-seed ``row - base`` of ``metric`` (the rows' keys differ by evaluator)."""
    a_key, b_key = f"unc_{row[1]}_{row[3]}_{metric}", f"unc_{base[1]}_{base[3]}_{metric}"
    base_by_seed = {r.get("seed"): r.get(b_key) for r in base[4]}
    out = []
    for r in row[4]:
        a, b = r.get(a_key), base_by_seed.get(r.get("seed"))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out.append(float(a) - float(b))
    return out


def _interval(diffs: Sequence[float]) -> str:
    if not diffs:
        return ""
    s = paired_summary(list(diffs))
    if s["ci_low"] is None:
        return f"{s['mean_diff']:+.3f}"
    return f"{s['mean_diff']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def _mean_curve(runs: Sequence[dict[str, Any]], name: str) -> list[tuple[float, float]]:
    curves = [r[name] for r in runs if isinstance(r.get(name), list) and r[name]]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [
        (statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves))
        for i in range(n)
    ]


def plot_uncertainty(sec: Section, path: Path) -> Path | None:
    """Per variant: the reliability diagram (bins pooled over seeds) and the
    risk-coverage curve (mean over seeds) of every evaluator."""
    from gyrodrop.experiments.report.plots import _pool_bins, _pyplot, save_figure

    plt = _pyplot()
    if plt is None:
        return None
    rows = uncertainty_rows(sec)
    variants = list(dict.fromkeys(r[0] for r in rows))
    if not variants:
        return None
    fig, axes = plt.subplots(2, len(variants), figsize=(3.8 * len(variants), 7), squeeze=False)
    for col, vkey in enumerate(variants):
        rel, rc = axes[0][col], axes[1][col]
        rel.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        drawn: set[str] = set()
        for v, key, label, score, runs in rows:
            if v != vkey:
                continue
            if key not in drawn:
                drawn.add(key)
                pooled = _pool_bins(runs, f"reliability_unc_{key}") or []
                bins = [b for b in pooled if b[2] > 0]
                rel.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", ms=3, label=label)
            curve = _mean_curve(runs, f"rc_{key}_{score}")
            rc.plot(
                [c for c, _ in curve],
                [r for _, r in curve],
                label=f"{label} ({_SCORE_NAMES[score]})",
            )
        rel.set(title=_variant_label(vkey), xlabel="confidence", ylabel="accuracy")
        rel.set(xlim=(0, 1), ylim=(0, 1))
        rc.set(xlabel="coverage (least uncertain kept)", ylabel="risk (error rate)", xlim=(0, 1))
        rel.legend(fontsize=7)
        rc.legend(fontsize=6)
    return save_figure(fig, path, section_label(sec))
