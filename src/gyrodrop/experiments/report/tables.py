"""Markdown tables: method comparison, sigma x tau sweep, diversity, throughput."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gyrodrop.experiments.report.grouping import (
    _METHOD_ORDER,
    Section,
    _mean,
    _num,
    _opt,
    _pct,
    _pct_sd,
    _sd,
)

__all__ = [
    "markdown",
    "compare_table",
    "sweep_grid",
    "sweep_table",
    "diversity_table",
    "bench_tables",
]


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
    """Table 4/5-style: test accuracy mean ± SD (after the last epoch, and the best
    epoch's when recorded), train accuracy, generalization gap
    (train minus test accuracy, points), NLL, ECE, Brier, epoch time; with MC-dropout /
    subnetwork-ensemble columns when those were measured."""
    runs_all = sec.records
    has_best = any("best_test_acc" in r for r in runs_all)
    has_mc = any("mc_acc" in r for r in runs_all)
    has_ens = any("ens_acc" in r for r in runs_all)
    header = [
        "Method",
        "p",
        "σ (subnets)",
        "τ (per step)",
        "n",
        "Test acc (%)",
        *(["Best-epoch test acc (%)"] if has_best else []),
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
            *([_pct_sd(runs, "best_test_acc")] if has_best else []),
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
    mean test accuracy (%) over seeds, best in bold (a second grid of the best-epoch
    accuracy when recorded); baselines listed below."""
    parts = []
    methods = sorted(
        {v[0] for v in sec.variants if v[3] is not None}, key=lambda m: _METHOD_ORDER.get(m, 9)
    )
    metrics = ["test_acc"]
    if any("best_test_acc" in r for r in sec.records):
        metrics.append("best_test_acc")
    for method, metric in ((m, k) for m in methods for k in metrics):
        sigmas, taus, cells = sweep_grid(sec, method)
        best = max((_mean(r, metric) or 0.0) for r in cells.values()) if cells else None
        rows = []
        for s in sigmas:
            row: list[Any] = [s]
            for t in taus:
                m = _mean(cells[(s, t)], metric) if (s, t) in cells else None
                text = "N/A" if m is None else _pct(m)
                if m is not None and best is not None and m == best:
                    text = f"**{text}**"
                row.append(text)
            rows.append(row)
        what = "test accuracy" if metric == "test_acc" else "best-epoch test accuracy"
        parts.append(
            f"{method}: {what} (%), rows σ, columns τ\n\n"
            + markdown(["σ \\ τ", *[str(t) for t in taus]], rows)
        )
    base = [(v, r) for v, r in sec.ordered() if v[3] is None]
    if base:
        parts.append(
            "Baselines: "
            + "; ".join(
                f"{v[0]} {_pct_sd(r, 'test_acc')} %"
                + (
                    f" (best epoch {_pct_sd(r, 'best_test_acc')} %)"
                    if "best_test_acc" in metrics
                    else ""
                )
                for v, r in base
            )
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
