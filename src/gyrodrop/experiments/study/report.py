"""The report of a study plan: Markdown tables, one plot and JSON, all recomputed from
the results database (:func:`write_report`; ``gyrodrop study PLAN --report``).

Runs are grouped in **cells** (model x training-set size) and **arms** (the method, with
sigma/tau when they differ from the plan's recipe, and "diversity" for the runs that
measured Figure 5's diversity). Tables:

1. per cell and arm: seeds, final test accuracy (primary), validation-selected test
   accuracy, the best-over-epochs test accuracy (the paper's metric: optimistic),
   training accuracy, generalization gap, NLL, ECE;
2. paired differences against the baseline (dropout) for the final, the
   validation-selected and the best-over-epochs test accuracy: mean, 95% t interval,
   Wilcoxon p and Holm-adjusted p over the rows of each table;
3. gap, NLL and ECE differences against the baseline (mean and 95% interval);
4. the ensemble effect: single deterministic network vs MC dropout vs the gyro
   subnetwork ensemble (accuracy, NLL, ECE), paired against dropout's single network;
5. with gyro-random runs, Table 6 (random minus consecutive scheduling), and with
   diversity runs, Figure 5's mean feature distance.

Files in ``out``: ``<plan>.md``, ``<plan>.json`` and ``<plan>-vs-<baseline>.png``
(difference to the baseline against the training-set size, one line per method).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gyrodrop.experiments.report.paired import paired_summary
from gyrodrop.experiments.report.tables import markdown
from gyrodrop.experiments.store import Store
from gyrodrop.experiments.study.plan import Plan
from gyrodrop.experiments.study.stats import derive, holm, paired, seed_differences

__all__ = ["write_report", "build_report", "arm_label"]

Run = dict[str, Any]
#: (column title, metric) of the paired accuracy tables.
ACC_TABLES: tuple[tuple[str, str, str], ...] = (
    ("final", "final_acc", "final test accuracy (primary)"),
    ("selected", "sel_acc", "test accuracy at the validation-selected epoch (secondary)"),
    ("best", "best_acc", "best test accuracy over epochs (the paper's metric; optimistic)"),
)


def arm_label(r: Run, recipe: dict[str, Any]) -> str:
    """The arm of run ``r``: its method, plus ``σ=.. τ=..`` when they differ from the
    plan recipe's, plus ``diversity`` for runs that measured it."""
    label = str(r["method"])
    sig, tau = r.get("num_subnets"), r.get("subnets_per_step")
    if sig is not None and (
        sig != recipe.get("num_subnets", 256) or tau != recipe.get("subnets_per_step", 16)
    ):
        label += f" σ={sig} τ={tau}"
    if r.get("subnetworks") is not None:
        label += " (diversity)"
    return label


def _vals(runs: Sequence[Run], key: str) -> list[float]:
    out = []
    for r in runs:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _ms(runs: Sequence[Run], key: str, scale: float = 100.0, digits: int = 2) -> str:
    v = _vals(runs, key)
    if not v:
        return "–"
    sd = f" ± {scale * statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
    return f"{scale * statistics.fmean(v):.{digits}f}{sd}"


def _ci(e: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    if e.get("mean_diff") is None:
        return "–"
    mean = f"{scale * e['mean_diff']:+.{digits}f}"
    if e.get("ci_low") is None:
        return mean
    return f"{mean} [{scale * e['ci_low']:+.{digits}f}, {scale * e['ci_high']:+.{digits}f}]"


def _p(v: float | None) -> str:
    return "–" if v is None else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


class _Cells:
    """Runs grouped as ``{(model, size): {arm: [runs]}}`` in plan order."""

    def __init__(self, runs: Sequence[Run], recipe: dict[str, Any]) -> None:
        self.cells: dict[tuple[str, int], dict[str, list[Run]]] = {}
        for r in runs:
            cell = self.cells.setdefault((r["model"], r["train_size"]), {})
            cell.setdefault(arm_label(r, recipe), []).append(r)

    def items(self) -> list[tuple[tuple[str, int], dict[str, list[Run]]]]:
        return list(self.cells.items())


def _compared(arm: str, baseline: str) -> bool:
    """Whether ``arm`` gets a paired comparison with ``baseline``: not the baseline
    itself, nor a ``(diversity)`` arm (the same training as its method's arm, plus a
    measurement: comparing it again would only add a duplicate test to Holm's count)."""
    return arm != baseline and not arm.endswith(" (diversity)")


def _complete_seeds(arms: dict[str, list[Run]]) -> int:
    """Seeds every arm of a cell has (complete pairs)."""
    sets = [{r["seed"] for r in runs} for runs in arms.values()]
    return len(set.intersection(*sets)) if sets else 0


def _summary_rows(cells: _Cells) -> tuple[list[list[str]], list[dict[str, Any]]]:
    rows, data = [], []
    for (model, size), arms in cells.items():
        for arm, runs in arms.items():
            rows.append(
                [
                    model,
                    f"{size:,}",
                    arm,
                    str(len(runs)),
                    _ms(runs, "final_acc"),
                    _ms(runs, "sel_acc"),
                    _ms(runs, "best_acc"),
                    _ms(runs, "train_acc"),
                    _ms(runs, "gap"),
                    _ms(runs, "test_nll", 1.0, 3),
                    _ms(runs, "test_ece", 1.0, 3),
                ]
            )
            entry: dict[str, Any] = {"model": model, "train_size": size, "arm": arm}
            entry["seeds"] = sorted(r["seed"] for r in runs)
            for k in ("final_acc", "sel_acc", "best_acc", "train_acc", "gap", "sel_gap"):
                entry[k] = _vals(runs, k)
            for k in ("test_nll", "test_ece", "sel_epoch", "wall_seconds"):
                entry[k] = _vals(runs, k)
            data.append(entry)
    return rows, data


def _paired_table(
    cells: _Cells, baseline: str, metric: str, scale: float = 100.0
) -> list[dict[str, Any]]:
    """Every arm against ``baseline`` in its cell on ``metric``, Holm over the table."""
    out = []
    for (model, size), arms in cells.items():
        base = arms.get(baseline)
        if not base:
            continue
        for arm, runs in arms.items():
            if not _compared(arm, baseline):
                continue
            e: dict[str, Any] = {"model": model, "train_size": size, "arm": arm}
            e.update(baseline=baseline, metric=metric)
            e.update(paired(runs, base, metric))
            out.append(e)
    for e, adj in zip(out, holm([e["p_value"] for e in out]), strict=True):
        e["p_holm"] = adj
    return out


def _paired_md(entries: Sequence[dict[str, Any]], unit: str = "points") -> str:
    rows = [
        [
            e["model"],
            f"{e['train_size']:,}",
            e["arm"],
            str(e["n"]),
            _ci(e),
            _p(e["p_value"]),
            _p(e["p_holm"]),
        ]
        for e in entries
    ]
    head = ["model", "n train", "method", "seeds", f"difference ({unit}) [95% CI]"]
    return markdown([*head, "Wilcoxon p", "Holm p"], rows)


def _crosstab(cells: _Cells, entries: Sequence[dict[str, Any]], baseline: str) -> str:
    """One row per cell: the baseline's final accuracy (mean ± SD) and every other
    arm's paired difference with its interval and Holm p."""
    arms = list(
        dict.fromkeys(a for _, cell in cells.items() for a in cell if _compared(a, baseline))
    )
    found = {(e["model"], e["train_size"], e["arm"]): e for e in entries}
    rows = []
    for (model, size), cell in cells.items():
        row = [model, f"{size:,}", str(_complete_seeds(cell))]
        row.append(_ms(cell.get(baseline, []), "final_acc"))
        for arm in arms:
            e = found.get((model, size, arm))
            row.append("–" if e is None else f"{_ci(e)} (p {_p(e['p_holm'])})")
        rows.append(row)
    head = ["model", "n train", "seeds", f"{baseline} (%)", *(f"{a} − {baseline}" for a in arms)]
    return markdown(head, rows)


def _pooled(cells: _Cells, baseline: str, metric: str = "final_acc") -> list[dict[str, Any]]:
    """Per model of more than one size, every arm's difference to ``baseline`` averaged
    over the sizes within each seed, then compared over seeds (the seed is the unit:
    one t interval and one Wilcoxon test per arm); Holm over the table. Seeds missing
    any size of the arm or the baseline are left out."""
    by_model: dict[str, dict[int, dict[str, list[Run]]]] = {}
    for (model, size), cell_arms in cells.items():
        by_model.setdefault(model, {})[size] = cell_arms
    out = []
    for model, sizes in by_model.items():
        if len(sizes) < 2:
            continue
        names = dict.fromkeys(a for c in sizes.values() for a in c if _compared(a, baseline))
        for arm in names:
            per_seed: dict[int, list[float]] = {}
            for cell in sizes.values():
                found = seed_differences(cell.get(arm, []), cell.get(baseline, []), metric)
                for seed, d in found.items():
                    per_seed.setdefault(seed, []).append(d)
            diffs = [
                statistics.fmean(d) for _, d in sorted(per_seed.items()) if len(d) == len(sizes)
            ]
            e: dict[str, Any] = {"model": model, "sizes": sorted(sizes), "arm": arm}
            e.update(baseline=baseline, metric=metric, **paired_summary(diffs))
            out.append(e)
    for e, adj in zip(out, holm([e["p_value"] for e in out]), strict=True):
        e["p_holm"] = adj
    return out


def _pooled_md(entries: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            e["model"],
            ", ".join(f"{s:,}" for s in e["sizes"]),
            e["arm"],
            str(e["n"]),
            _ci(e),
            _p(e["p_value"]),
            _p(e["p_holm"]),
        ]
        for e in entries
    ]
    head = ["model", "sizes", "method", "seeds", "mean difference (points) [95% CI]"]
    return markdown([*head, "Wilcoxon p", "Holm p"], rows)


def _others_md(cells: _Cells, baseline: str) -> tuple[str, list[dict[str, Any]]]:
    rows, data = [], []
    metrics = (("gap", 100.0, 2), ("test_nll", 1.0, 3), ("test_ece", 1.0, 3))
    for (model, size), arms in cells.items():
        base = arms.get(baseline)
        if not base:
            continue
        for arm, runs in arms.items():
            if not _compared(arm, baseline):
                continue
            row = [model, f"{size:,}", arm]
            for m, scale, digits in metrics:
                e = paired(runs, base, m)
                row.append(_ci(e, scale, digits))
                data.append({"model": model, "train_size": size, "arm": arm, "metric": m, **e})
            rows.append(row)
    head = ["model", "n train", "method", "gap (points)", "NLL", "ECE"]
    return markdown(head, rows), data


#: (label, metric prefix, which runs) of the ensemble-effect rows.
_ENSEMBLE: tuple[tuple[str, str], ...] = (
    ("single network", "test_"),
    ("MC dropout", "mc_"),
    ("subnetwork ensemble", "ens_"),
)


def _ensemble(cells: _Cells, baseline: str) -> tuple[str, list[dict[str, Any]]]:
    """Single deterministic network vs MC dropout vs subnetwork ensemble, per arm,
    paired against the baseline's single network; Holm over the accuracy p-values."""
    entries: list[dict[str, Any]] = []
    for (model, size), arms in cells.items():
        base = arms.get(baseline)
        for arm, runs in arms.items():
            if "σ" in arm or "diversity" in arm:
                continue
            for label, prefix in _ENSEMBLE:
                acc = "test_acc" if prefix == "test_" else f"{prefix}acc"
                if not _vals(runs, acc):
                    continue
                k = runs[0].get("mc_samples" if prefix == "mc_" else "ens_subnets")
                name = f"{arm}: {label}" + (f" ({k})" if prefix != "test_" and k else "")
                e: dict[str, Any] = {"model": model, "train_size": size, "arm": name}
                e["seeds"] = len(_vals(runs, acc))
                for m in ("acc", "nll", "ece"):
                    key = f"{prefix}{m}"
                    e[m] = _vals(runs, key)
                    if base and not (arm == baseline and prefix == "test_"):
                        bkey = "test_acc" if m == "acc" else f"test_{m}"
                        e[f"{m}_diff"] = paired(
                            [{**r, "x": r.get(key)} for r in runs],
                            [{**r, "x": r.get(bkey)} for r in base],
                            "x",
                        )
                entries.append(e)
    tested = [e for e in entries if "acc_diff" in e]
    for e, adj in zip(tested, holm([e["acc_diff"]["p_value"] for e in tested]), strict=True):
        e["acc_diff"]["p_holm"] = adj
    rows = []
    for e in entries:
        d = e.get("acc_diff")
        rows.append(
            [
                e["model"],
                f"{e['train_size']:,}",
                e["arm"],
                str(e["seeds"]),
                _ms([{"v": v} for v in e["acc"]], "v"),
                _ms([{"v": v} for v in e["nll"]], "v", 1.0, 3),
                _ms([{"v": v} for v in e["ece"]], "v", 1.0, 3),
                _ci(d) if d else "(reference)",
                _ci(e["nll_diff"], 1.0, 3) if d else "",
                _p(d.get("p_holm")) if d else "",
            ]
        )
    head = ["model", "n train", "prediction", "seeds", "accuracy %", "NLL", "ECE"]
    head += [f"accuracy vs {baseline} single (points) [95% CI]", "NLL vs it", "Holm p"]
    return markdown(head, rows), entries


def _table6(cells: _Cells) -> tuple[str, list[dict[str, Any]]]:
    rows, data = [], []
    for (model, size), arms in cells.items():
        if "gyro" in arms and "gyro-random" in arms:
            e: dict[str, Any] = {"model": model, "train_size": size, "arm": "gyro-random"}
            e["baseline"] = "gyro"
            e.update(paired(arms["gyro-random"], arms["gyro"], "final_acc"))
            data.append(e)
    for e, adj in zip(data, holm([e["p_value"] for e in data]), strict=True):
        e["p_holm"] = adj
    if data:
        rows = [
            [e["model"], f"{e['train_size']:,}", str(e["n"]), _ci(e), _p(e["p_value"])]
            for e in data
        ]
    head = ["model", "n train", "seeds", "random minus consecutive (points) [95% CI]"]
    return markdown([*head, "Wilcoxon p"], rows) if rows else "", data


def _diversity(cells: _Cells) -> tuple[str, list[dict[str, Any]]]:
    rows, data = [], []
    for (model, size), arms in cells.items():
        for arm, runs in arms.items():
            v = _vals(runs, "diversity_mean")
            if not v:
                continue
            data.append({"model": model, "train_size": size, "arm": arm, "diversity_mean": v})
            row = [model, f"{size:,}", arm, str(len(v))]
            rows.append([*row, _ms(runs, "diversity_mean", 1.0, 3), _ms(runs, "final_acc")])
    head = ["model", "n train", "method", "seeds", "mean feature distance", "test acc %"]
    return (markdown(head, rows) if rows else ""), data


def _plot(entries: Sequence[dict[str, Any]], baseline: str, path: Path, title: str) -> Path | None:
    from gyrodrop.experiments.report.plots import _pyplot, save_figure

    models = list(dict.fromkeys(e["model"] for e in entries))
    sizes = {m: {e["train_size"] for e in entries if e["model"] == m} for m in models}
    models = [m for m in models if len(sizes[m]) > 1]
    if not models:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        arms = list(dict.fromkeys(e["arm"] for e in entries if e["model"] == model))
        for j, arm in enumerate(arms):
            pts = [
                e
                for e in entries
                if e["model"] == model and e["arm"] == arm and e["mean_diff"] is not None
            ]
            pts.sort(key=lambda e: e["train_size"])
            x = [e["train_size"] * (1 + 0.03 * (j - len(arms) / 2)) for e in pts]
            y = [100 * e["mean_diff"] for e in pts]
            err = [
                [100 * (e["mean_diff"] - (e["ci_low"] or e["mean_diff"])) for e in pts],
                [100 * ((e["ci_high"] or e["mean_diff"]) - e["mean_diff"]) for e in pts],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.axhline(0, color="black", linewidth=0.8, label=baseline)
        ax.set_xscale("log")
        ticks = sorted(sizes[model])
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training-set size (images); bars: 95% t interval over seeds")
        ax.set_ylabel(f"final test accuracy minus {baseline} (points)")
        ax.set_title(f"{model}: {title}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_report(
    plan: Plan,
    runs: Sequence[Run],
    *,
    baseline: str = "dropout",
    db: str = "",
) -> tuple[str, dict[str, Any]]:
    """Markdown and the JSON-able data of the report of ``plan`` over ``runs`` (stored
    runs with their :func:`~gyrodrop.experiments.study.stats.derive` metrics)."""
    cells = _Cells(runs, plan.recipe)
    cpu = sum(_vals(runs, "wall_seconds"))
    lines = [f"# Study {plan.name}", "", "```", plan.summary(), "```", ""]
    planned = [(c.model, s) for c in plan.cells for s in c.sizes]
    seeds = {f"{m} {s}": 0 for m, s in dict.fromkeys(planned)}  # cells without runs: 0
    seeds.update({f"{m} {s}": _complete_seeds(arms) for (m, s), arms in cells.items()})
    lines.append(
        f"{len(runs)} runs from {db or 'the database'}; CPU time {cpu / 3600:.1f} h "
        "(sum of every run's training and evaluation wall time, one thread each). Seeds "
        "with every method finished, per cell: "
        + ", ".join(f"{k}: {v}" for k, v in seeds.items())
        + ". Accuracies in %, differences in percentage points, mean ± SD over seeds."
    )
    summary_rows, summary = _summary_rows(cells)
    at = len(lines)  # the summary cross-table goes here, before the per-cell table
    lines += ["", "## Accuracy per cell", ""]
    head = ["model", "n train", "method", "seeds", "final test acc", "val-selected"]
    head += ["best epoch (paper, optimistic)", "train acc", "gap", "NLL", "ECE"]
    lines.append(markdown(head, summary_rows))
    data: dict[str, Any] = {"plan": plan.name, "baseline": baseline, "runs": len(runs)}
    data.update(cpu_seconds=cpu, complete_seeds=seeds, cells=summary, paired={})
    for name, metric, title in ACC_TABLES:
        entries = _paired_table(cells, baseline, metric)
        data["paired"][name] = entries
        if name == "final" and entries:
            title_ = f"## Summary: final test accuracy, difference to {baseline} (95% CI, Holm p)"
            lines[at:at] = ["", title_, "", _crosstab(cells, entries, baseline)]
        if entries:
            lines += ["", f"## Paired against {baseline}: {title}", ""]
            lines.append("Holm's correction is over the rows of this table.")
            lines += ["", _paired_md(entries)]
    data["pooled"] = _pooled(cells, baseline)
    if data["pooled"]:
        lines += ["", f"## Pooled over sizes: final test accuracy, difference to {baseline}", ""]
        lines.append(
            "Each seed's difference averaged over the model's sizes, then the 95% t "
            "interval and the Wilcoxon test over seeds (the seed is the unit); is a method "
            "ahead on average across the ladder? Holm over the rows of this table."
        )
        lines += ["", _pooled_md(data["pooled"])]
    other, data["paired"]["gap_nll_ece"] = _others_md(cells, baseline)
    if data["paired"]["gap_nll_ece"]:
        lines += ["", f"## Paired against {baseline}: generalization gap, NLL, ECE", ""]
        lines += ["Mean difference [95% t interval] (method minus dropout).", "", other]
    ens, data["ensemble"] = _ensemble(cells, baseline)
    if data["ensemble"]:
        lines += ["", "## The ensemble effect", ""]
        lines.append(
            "Predictions of the same trained networks: the single deterministic network "
            "(eval mode), MC dropout (mean of k stochastic passes) and the gyro subnetwork "
            "ensemble (mean of k of the trained subnetworks), paired by seed against "
            f"{baseline}'s single network; Holm over the accuracy rows."
        )
        lines += ["", ens]
    t6, data["table6"] = _table6(cells)
    if t6:
        lines += ["", "## Table 6: random minus consecutive scheduling (final test acc)", "", t6]
    div, data["diversity"] = _diversity(cells)
    if div:
        lines += ["", "## Figure 5: diversity among subnetworks", "", div]
    return "\n".join(lines) + "\n", data


def write_report(
    plan: Plan,
    store: Store,
    keys: Sequence[str],
    out: Path,
    *,
    baseline: str = "dropout",
    plots: bool = True,
    db: str = "",
    load: Callable[[str], list[dict[str, Any]]] | None = None,
) -> tuple[str, list[Path]]:
    """Writes ``<plan>.md``, ``<plan>.json`` and the plot to ``out``; returns the Markdown
    and the files. Only the runs of ``keys`` (the plan's) found in ``store`` count."""
    epochs = load or store.epochs
    order = {k: i for i, k in enumerate(keys)}  # plan order: cells, sizes, methods
    records = sorted(store.records(keys=keys), key=lambda r: order[r["key"]])
    runs = [derive(r, epochs(r["key"])) for r in records]
    text, data = build_report(plan, runs, baseline=baseline, db=db)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{plan.name}.md", out / f"{plan.name}.json"]
    files[0].write_text(text)
    files[1].write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    if plots:
        png = _plot(
            data["paired"]["final"], baseline, out / f"{plan.name}-vs-{baseline}.png", plan.name
        )
        if png is not None:
            files.append(png)
            text += f"\n![difference to {baseline}]({png.name})\n"
            files[0].write_text(text)
    return text, files
