"""PNG plots (matplotlib's Agg backend, imported lazily): learning curves, sweep heat
maps, diversity matrices, reliability diagrams. Without matplotlib a note says the plots
were skipped and ``None`` is returned."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gyrodrop.experiments.report.grouping import (
    _METHOD_ORDER,
    Section,
    _mean,
    _variant_label,
    section_label,
)
from gyrodrop.experiments.report.tables import sweep_grid

__all__ = [
    "plot_learning_curves",
    "plot_sweep",
    "plot_diversity",
    "plot_reliability",
]


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


def save_figure(fig: Any, path: Path, title: str | None = None) -> Path:
    """Titles (``title``, small), lays out, writes ``path`` (its folder made) and closes
    ``fig``: the last step of every report plot."""
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


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
    return save_figure(fig, path, section_label(sec))


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
    return save_figure(fig, path, section_label(sec))


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
    return save_figure(fig, path, section_label(sec))


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
    return save_figure(fig, path, section_label(sec))
