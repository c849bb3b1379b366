"""Tables and plots from finished runs (records from :class:`~.store.Store`).

Runs are grouped in two levels: a *section* is everything that is the same across the
rows of one table (dataset, model, epochs, optimizer, ...); a *variant* is one row
(method and its hyperparameters); seeds and folds are the replicates averaged over.

Plots use matplotlib's Agg backend and are imported lazily; without matplotlib the
tables are still written and a note says the plots were skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Section",
    "sections",
    "compare_table",
    "sweep_table",
    "diversity_table",
    "bench_tables",
    "markdown",
    "records_json",
    "records_csv",
    "plot_learning_curves",
    "plot_sweep",
    "plot_diversity",
    "plot_reliability",
    "render_experiment",
    "section_label",
]

#: Replicate fields: averaged over, never a row.
REPLICATE = ("seed", "fold")
#: Variant fields: one table row per distinct value.
VARIANT = ("method", "p", "input_p", "num_subnets", "subnets_per_step", "block_size")
#: Bookkeeping fields of a record that are not configuration.
_NOT_CONFIG = {"key", "device", "version", "finished"}
_CONFIG_FIELDS = (
    "experiment",
    "dataset",
    "model",
    "method",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "max_norm",
    "p",
    "input_p",
    "num_subnets",
    "subnets_per_step",
    "block_size",
    "widths",
    "limit",
    "split_seed",
    "folds",
    "fold",
    "mc_samples",
)
_METHOD_ORDER = {"none": 0, "dropout": 1, "gyro": 2, "gyro-random": 3, "blockwise": 4}


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _sort_key(v: Any) -> tuple[int, Any]:
    return (1, "") if v is None else (0, v)


@dataclass
class Section:
    """Runs sharing every configuration field but the variant and replicate ones."""

    setting: dict[str, Any]
    variants: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """All runs of the section."""
        return [r for runs in self.variants.values() for r in runs]

    def ordered(self) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
        """Variants sorted by method (none, dropout, gyro, ...) then hyperparameters."""
        return sorted(
            self.variants.items(),
            key=lambda kv: (_METHOD_ORDER.get(kv[0][0], 9), [_sort_key(v) for v in kv[0][1:]]),
        )


def sections(records: Iterable[dict[str, Any]]) -> list[Section]:
    """Group records into :class:`Section` s, in order of first appearance."""
    out: dict[tuple[Any, ...], Section] = {}
    for rec in records:
        setting = {k: rec.get(k) for k in _CONFIG_FIELDS if k not in VARIANT and k not in REPLICATE}
        skey = tuple(_freeze(setting[k]) for k in sorted(setting))
        sec = out.setdefault(skey, Section(setting))
        vkey = tuple(_freeze(rec.get(k)) for k in VARIANT)
        sec.variants.setdefault(vkey, []).append(rec)
    return list(out.values())


def section_label(sec: Section) -> str:
    """``digits / mlp: 20 epochs, batch 256, rmsprop lr 0.001`` and the non-defaults."""
    s = sec.setting
    parts = [
        f"{s['epochs']} epochs",
        f"batch {s['batch_size']}",
        f"{s['optimizer']} lr {s['lr']:g}",
    ]
    if s.get("momentum"):
        parts.append(f"momentum {s['momentum']:g}")
    if s.get("max_norm") is not None:
        parts.append(f"max-norm {s['max_norm']:g}")
    if s.get("widths"):
        parts.append("widths " + "-".join(str(w) for w in s["widths"]))
    if s.get("limit") is not None:
        parts.append(f"limit {s['limit']}")
    if s.get("folds"):
        parts.append(f"{s['folds']}-fold CV")
    return f"{s['dataset']} / {s['model']}: " + ", ".join(parts)


def slug(sec: Section) -> str:
    """File-name stem of a section, e.g. ``compare_digits_mlp``."""
    s = sec.setting
    raw = f"{s['experiment']}_{s['dataset']}_{s['model']}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)


def _values(runs: Sequence[dict[str, Any]], name: str) -> list[float]:
    out = []
    for r in runs:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _mean(runs: Sequence[dict[str, Any]], name: str) -> float | None:
    v = _values(runs, name)
    return statistics.fmean(v) if v else None


def _sd(runs: Sequence[dict[str, Any]], name: str) -> float | None:
    v = _values(runs, name)
    return statistics.stdev(v) if len(v) > 1 else None


def _pct(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}"


def _pct_sd(runs: Sequence[dict[str, Any]], name: str) -> str:
    m, s = _mean(runs, name), _sd(runs, name)
    if m is None:
        return ""
    return f"{100 * m:.2f} ± {100 * s:.2f}" if s is not None else f"{100 * m:.2f}"


def _num(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _opt(v: Any) -> str:
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table.

    Example:
        >>> print(markdown(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def compare_table(sec: Section) -> str:
    """Table 4/5-style: test accuracy mean ± SD, train accuracy, generalization gap
    (train minus test accuracy, points), NLL, ECE, Brier, epoch time; with MC-dropout /
    subnetwork-ensemble columns when those were measured."""
    runs_all = sec.records
    has_mc = any("mc_acc" in r for r in runs_all)
    has_ens = any("ens_acc" in r for r in runs_all)
    header = [
        "Method",
        "p",
        "σ (subnets)",
        "τ (per step)",
        "n",
        "Test acc (%)",
        "Train acc (%)",
        "Gap (pts)",
        "Test NLL",
        "ECE",
        "Brier",
        "Epoch time (s)",
    ]
    if has_mc:
        header += ["MC acc (%)", "MC NLL", "MC ECE"]
    if has_ens:
        header += ["Ens acc (%)", "Ens NLL", "Ens ECE"]
    rows = []
    for vkey, runs in sec.ordered():
        method, p, input_p, sigma, tau, block = vkey
        label = method + (f" (block {block})" if block else "")
        pcol = _opt(p) + (f", input {input_p:g}" if input_p else "")
        row = [
            label,
            pcol,
            _opt(sigma),
            _opt(tau),
            len(runs),
            _pct_sd(runs, "test_acc"),
            _pct(_mean(runs, "train_acc")),
            _pct(_mean(runs, "gap")),
            _num(_mean(runs, "test_nll")),
            _num(_mean(runs, "test_ece")),
            _num(_mean(runs, "test_brier")),
            _num(_mean(runs, "epoch_time"), 2),
        ]
        if has_mc:
            row += [
                _pct_sd(runs, "mc_acc"),
                _num(_mean(runs, "mc_nll")),
                _num(_mean(runs, "mc_ece")),
            ]
        if has_ens:
            row += [
                _pct_sd(runs, "ens_acc"),
                _num(_mean(runs, "ens_nll")),
                _num(_mean(runs, "ens_ece")),
            ]
        rows.append(row)
    return markdown(header, rows)


def sweep_grid(
    sec: Section, method: str
) -> tuple[list[int], list[int], dict[tuple[int, int], list[dict[str, Any]]]]:
    """``(sigmas, taus, {(sigma, tau): runs})`` of ``method`` in ``sec``."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for vkey, runs in sec.variants.items():
        if vkey[0] == method and vkey[3] is not None and vkey[4] is not None:
            cells.setdefault((int(vkey[3]), int(vkey[4])), []).extend(runs)
    sigmas = sorted({s for s, _ in cells})
    taus = sorted({t for _, t in cells})
    return sigmas, taus, cells


def sweep_table(sec: Section) -> str:
    """Table 1-style: rows sigma (total subnetworks), columns tau (co-scheduled), cells
    mean test accuracy (%) over seeds, best in bold; baselines listed below."""
    parts = []
    methods = sorted(
        {v[0] for v in sec.variants if v[3] is not None}, key=lambda m: _METHOD_ORDER.get(m, 9)
    )
    for method in methods:
        sigmas, taus, cells = sweep_grid(sec, method)
        best = max((_mean(r, "test_acc") or 0.0) for r in cells.values()) if cells else None
        rows = []
        for s in sigmas:
            row: list[Any] = [s]
            for t in taus:
                m = _mean(cells[(s, t)], "test_acc") if (s, t) in cells else None
                text = "N/A" if m is None else _pct(m)
                if m is not None and best is not None and m == best:
                    text = f"**{text}**"
                row.append(text)
            rows.append(row)
        parts.append(
            f"{method}: test accuracy (%), rows σ, columns τ\n\n"
            + markdown(["σ \\ τ", *[str(t) for t in taus]], rows)
        )
    base = [(v, r) for v, r in sec.ordered() if v[3] is None]
    if base:
        parts.append(
            "Baselines: " + "; ".join(f"{v[0]} {_pct_sd(r, 'test_acc')} %" for v, r in base)
        )
    return "\n\n".join(parts)


def diversity_table(sec: Section) -> str:
    """Figure 5-style: mean pairwise normalized L1 distance of last-hidden features among
    subnetworks, per method, and relative to dropout."""
    rows = []
    ref = None
    for vkey, runs in sec.ordered():
        if vkey[0] == "dropout":
            ref = _mean(runs, "diversity_mean")
    for vkey, runs in sec.ordered():
        m = _mean(runs, "diversity_mean")
        rel = "" if m is None or not ref else f"{m / ref:.3f}"
        rows.append(
            [
                vkey[0],
                len(runs),
                _num(m, 4),
                _num(_sd(runs, "diversity_mean"), 4),
                rel,
                _pct_sd(runs, "test_acc"),
            ]
        )
    return markdown(
        ["Method", "n", "Mean L1 distance", "SD", "Relative to dropout", "Test acc (%)"], rows
    )


def bench_tables(records: Sequence[dict[str, Any]]) -> str:
    """Figure 7 (ms per training step per method) and Table 7 (block-wise layer) tables."""
    parts = []
    steps = [r for r in records if r.get("kind") == "train_step"]
    if steps:
        base: dict[tuple[Any, ...], float] = {}
        for r in steps:
            if r["method"] == "dropout":
                base[(r["model"], r["dataset"], r["device"])] = r["ms_per_step"]
        rows = []
        for r in sorted(
            steps, key=lambda r: (r["model"], r["dataset"], _METHOD_ORDER.get(r["method"], 9))
        ):
            b = base.get((r["model"], r["dataset"], r["device"]))
            rel = f"{b / r['ms_per_step']:.2f}x" if b else ""
            rows.append(
                [
                    r["dataset"],
                    r["model"],
                    r["method"],
                    r["batch_size"],
                    r["device"],
                    f"{r['ms_per_step']:.2f}",
                    f"{r['samples_per_s']:.0f}",
                    rel,
                ]
            )
        parts.append(
            "Training step time (Figure 7)\n\n"
            + markdown(
                [
                    "Dataset",
                    "Model",
                    "Method",
                    "Batch",
                    "Device",
                    "ms / step",
                    "samples / s",
                    "Speedup vs dropout",
                ],
                rows,
            )
        )
    layer = [r for r in records if r.get("kind") == "block_layer"]
    if layer:
        rows = [
            [
                f"{100 * r['drop']:.0f}%",
                r["features"],
                r["batch_size"],
                r["device"],
                f"{r['dense_ms']:.3f}",
                f"{r['block_ms']:.3f}",
                f"{r['dense_ms'] / r['block_ms']:.2f}x",
                f"{r['dense_train_ms']:.3f}",
                f"{r['block_train_ms']:.3f}",
                f"{r['dense_train_ms'] / r['block_train_ms']:.2f}x",
                f"{100 * r['kept_flops']:.1f}%",
            ]
            for r in sorted(layer, key=lambda r: r["drop"])
        ]
        parts.append(
            "Block-wise layer vs dense nn.Linear (Table 7): forward, and forward + backward\n\n"
            + markdown(
                [
                    "Drop ratio",
                    "Features",
                    "Batch",
                    "Device",
                    "Dense fwd ms",
                    "Block fwd ms",
                    "Fwd speedup",
                    "Dense fwd+bwd ms",
                    "Block fwd+bwd ms",
                    "Fwd+bwd speedup",
                    "FLOPs kept",
                ],
                rows,
            )
        )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- export


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not isinstance(v, (list, dict)) or k == "widths"}


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """JSON list, one object per run: configuration and scalar metrics (accuracies as
    fractions in [0, 1])."""
    return json.dumps([_flat(r) for r in records], indent=1, sort_keys=True)


def records_csv(records: Sequence[dict[str, Any]]) -> str:
    """CSV, one row per run, columns: configuration then scalar metrics."""
    flat = [_flat(r) for r in records]
    for r in flat:
        if r.get("widths") is not None:
            r["widths"] = "-".join(str(w) for w in r["widths"])
    cols: list[str] = [c for c in _CONFIG_FIELDS if any(c in r for r in flat)]
    for r in flat:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        print(
            "note: matplotlib is not installed; plots skipped "
            '(pip install "gyrodrop[experiments]")',
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_label(vkey: tuple[Any, ...]) -> str:
    method, p, input_p, sigma, tau, block = vkey
    extra = []
    if sigma is not None:
        extra.append(f"σ={sigma}, τ={tau}")
    if block:
        extra.append(f"block {block}")
    return method + (f" ({', '.join(extra)})" if extra else "")


def plot_learning_curves(
    sec: Section, epochs_of: Callable[[str], list[dict[str, Any]]], path: Path
) -> Path | None:
    """Test accuracy and training loss per epoch, mean ± SD over replicates, per variant."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for vkey, runs in sec.ordered():
        curves = [epochs_of(r["key"]) for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = list(range(1, n + 1))
        for ax, name in ((ax_acc, "test_acc"), (ax_loss, "train_loss")):
            cols = [[c[i][name] for c in curves] for i in range(n)]
            mean = [statistics.fmean(v) for v in cols]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in cols]
            scale = 100.0 if name == "test_acc" else 1.0
            (line,) = ax.plot(xs, [m * scale for m in mean], label=_variant_label(vkey))
            ax.fill_between(
                xs,
                [(m - s) * scale for m, s in zip(mean, sd, strict=False)],
                [(m + s) * scale for m, s in zip(mean, sd, strict=False)],
                color=line.get_color(),
                alpha=0.2,
            )
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    ax_acc.legend(fontsize=8)
    fig.suptitle(section_label(sec), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sec: Section, path: Path) -> Path | None:
    """Heat map of mean test accuracy over (sigma, tau), one panel per method."""
    plt = _pyplot()
    if plt is None:
        return None
    methods = sorted(
        {v[0] for v in sec.variants if v[3] is not None}, key=lambda m: _METHOD_ORDER.get(m, 9)
    )
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=False):
        sigmas, taus, cells = sweep_grid(sec, method)
        grid = [
            [
                (_mean(cells[(s, t)], "test_acc") or math.nan) * 100
                if (s, t) in cells
                else math.nan
                for t in taus
            ]
            for s in sigmas
        ]
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(taus)), [str(t) for t in taus])
        ax.set_yticks(range(len(sigmas)), [str(s) for s in sigmas])
        ax.set(xlabel="τ (co-scheduled subnetworks)", ylabel="σ (total subnetworks)", title=method)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.suptitle(section_label(sec), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_diversity(sec: Section, path: Path) -> Path | None:
    """Pairwise feature-distance matrices among subnetworks (first replicate of each
    method) and a bar chart of the means relative to dropout (Figure 5)."""
    plt = _pyplot()
    if plt is None:
        return None
    variants = [(v, r) for v, r in sec.ordered() if any("diversity_matrix" in x for x in r)]
    if not variants:
        return None
    fig, axes = plt.subplots(
        1, len(variants) + 1, figsize=(4.2 * (len(variants) + 1), 3.8), squeeze=False
    )
    vmax = max(max(max(row) for row in r[0]["diversity_matrix"]) for _, r in variants) or 1.0
    for ax, (vkey, runs) in zip(axes[0], variants, strict=False):
        im = ax.imshow(runs[0]["diversity_matrix"], cmap="magma", vmin=0, vmax=vmax)
        ax.set(title=f"{vkey[0]}: L1 distance", xlabel="subnetwork", ylabel="subnetwork")
        ticks = range(len(runs[0]["diversity_matrix"]))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        fig.colorbar(im, ax=ax, fraction=0.046)
    ref = next((_mean(r, "diversity_mean") for v, r in variants if v[0] == "dropout"), None)
    ax = axes[0][-1]
    names = [v[0] for v, _ in variants]
    means = [_mean(r, "diversity_mean") or 0.0 for _, r in variants]
    vals = [m / ref for m in means] if ref else means
    ax.bar(names, vals, color=["tab:blue" if n == "dropout" else "tab:green" for n in names])
    ax.set(
        title="mean distance" + (" / dropout" if ref else ""), ylabel="relative" if ref else "L1"
    )
    fig.suptitle(section_label(sec), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pool_bins(runs: Sequence[dict[str, Any]], name: str) -> list[tuple[float, float, int]] | None:
    tables = [r[name] for r in runs if isinstance(r.get(name), list)]
    if not tables:
        return None
    pooled = []
    for b in range(len(tables[0])):
        n = sum(t[b][2] for t in tables)
        conf = sum(t[b][0] * t[b][2] for t in tables) / n if n else 0.0
        acc = sum(t[b][1] * t[b][2] for t in tables) / n if n else 0.0
        pooled.append((conf, acc, n))
    return pooled


def plot_reliability(sec: Section, path: Path) -> Path | None:
    """Reliability diagram (15 bins, pooled over replicates): plain eval, MC dropout and
    the subnetwork ensemble, one panel per variant."""
    plt = _pyplot()
    if plt is None:
        return None
    variants = [(v, r) for v, r in sec.ordered() if any("reliability" in x for x in r)]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.6), squeeze=False)
    for ax, (vkey, runs) in zip(axes[0], variants, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name, label in (
            ("reliability", "eval"),
            ("reliability_mc", "MC dropout"),
            ("reliability_ens", "subnet ensemble"),
        ):
            bins = _pool_bins(runs, name)
            if bins:
                pts = [(c, a) for c, a, n in bins if n > 0]
                ax.plot(
                    [c for c, _ in pts], [a for _, a in pts], marker="o", markersize=3, label=label
                )
        ax.set(
            title=_variant_label(vkey),
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(fontsize=7)
    fig.suptitle(section_label(sec), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- rendering

_TABLES: dict[str, tuple[str, Callable[[Section], str]]] = {
    "compare": ("Method comparison (Tables 4 and 5)", compare_table),
    "cv": ("Stratified k-fold cross-validation, mean ± SD over folds and seeds", compare_table),
    "sweep": ("Subnetwork sweep (Table 1)", sweep_table),
    "diversity": ("Subnetwork diversity (Figure 5)", diversity_table),
}


def _unique_stems(secs: Sequence[Section]) -> list[str]:
    stems = [slug(s) for s in secs]
    seen: dict[str, int] = {}
    out = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if stems.count(stem) == 1 else f"{stem}_{seen[stem]}")
    return out


def render_experiment(
    experiment: str,
    records: Sequence[dict[str, Any]],
    epochs_of: Callable[[str], list[dict[str, Any]]],
    out: Path | None,
    *,
    plots: bool = True,
) -> tuple[str, list[Path]]:
    """Markdown for every section of ``experiment`` and, with ``out``, its ``.md`` and
    ``.png`` files there. Returns ``(markdown, files written)``."""
    title, table = _TABLES.get(experiment, ("Runs", compare_table))
    secs = sections(r for r in records if r.get("experiment") == experiment)
    if not secs:
        return "", []
    stems = _unique_stems(secs)
    files: list[Path] = []
    chunks = [f"## {title}"]
    for sec, stem in zip(secs, stems, strict=False):
        body = table(sec)
        pngs: list[Path | None] = []
        if out is not None and plots:
            if experiment in ("compare", "cv"):
                pngs.append(plot_learning_curves(sec, epochs_of, out / f"{stem}.png"))
                if any("reliability" in r for r in sec.records):
                    pngs.append(plot_reliability(sec, out / f"{stem}_reliability.png"))
            elif experiment == "sweep":
                pngs.append(plot_sweep(sec, out / f"{stem}.png"))
            elif experiment == "diversity":
                pngs.append(plot_diversity(sec, out / f"{stem}.png"))
        images = "".join(f"\n\n![{p.stem}]({p.name})" for p in pngs if p is not None)
        text = f"### {section_label(sec)}\n\n{body}{images}\n"
        chunks.append(text)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            md = out / f"{stem}.md"
            md.write_text(f"# {title}\n\n{text}")
            files.append(md)
        files += [p for p in pngs if p is not None]
    return "\n".join(chunks), files
