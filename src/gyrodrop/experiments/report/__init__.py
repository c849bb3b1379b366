"""Tables and plots from finished runs (records from :class:`~gyrodrop.experiments.store.Store`).

Runs are grouped in two levels (:mod:`.grouping`): a *section* is everything that is the
same across the rows of one table (dataset, model, epochs, optimizer, recipe, ...); a
*variant* is one row (method and its hyperparameters); seeds and folds are the
replicates averaged over and paired by. :mod:`.tables` writes the Markdown tables,
:mod:`.paired` the paired statistics against a baseline, :mod:`.export` JSON and CSV,
:mod:`.plots` the PNG plots (matplotlib's Agg backend, imported lazily; without
matplotlib the tables are still written and a note says the plots were skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gyrodrop.experiments.report.export import records_csv, records_json
from gyrodrop.experiments.report.grouping import Section, section_label, sections, slug
from gyrodrop.experiments.report.paired import (
    PAIRED_METRICS,
    paired_csv,
    paired_json,
    paired_stats,
    paired_summary,
    paired_table,
)
from gyrodrop.experiments.report.plots import (
    plot_diversity,
    plot_learning_curves,
    plot_reliability,
    plot_sweep,
)
from gyrodrop.experiments.report.tables import (
    bench_tables,
    compare_table,
    diversity_table,
    markdown,
    sweep_grid,
    sweep_table,
)
from gyrodrop.experiments.report.uncertainty import (
    has_uncertainty,
    plot_uncertainty,
    uncertainty_paired_table,
    uncertainty_table,
)

__all__ = [
    "Section",
    "sections",
    "compare_table",
    "sweep_table",
    "sweep_grid",
    "diversity_table",
    "bench_tables",
    "markdown",
    "records_json",
    "records_csv",
    "PAIRED_METRICS",
    "paired_stats",
    "paired_summary",
    "paired_table",
    "paired_json",
    "paired_csv",
    "plot_learning_curves",
    "plot_sweep",
    "plot_diversity",
    "plot_reliability",
    "plot_uncertainty",
    "uncertainty_table",
    "uncertainty_paired_table",
    "render_experiment",
    "section_label",
    "slug",
]

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
    paired: str | None = None,
) -> tuple[str, list[Path]]:
    """Markdown for every section of ``experiment`` and, with ``out``, its ``.md`` and
    ``.png`` files there; with ``paired`` (a baseline method), each section's paired
    statistics against it (:func:`paired_stats`) below its table. Returns
    ``(markdown, files written)``."""
    title, table = _TABLES.get(experiment, ("Runs", compare_table))
    secs = sections(r for r in records if r.get("experiment") == experiment)
    if not secs:
        return "", []
    stems = _unique_stems(secs)
    files: list[Path] = []
    chunks = [f"## {title}"]
    for sec, stem in zip(secs, stems, strict=False):
        body = table(sec)
        if paired is not None:
            extra = paired_table(paired_stats(sec.records, paired))
            if extra:
                body += "\n\n" + extra
        if has_uncertainty(sec):
            body += "\n\n#### Uncertainty (in-distribution test set; OOD: held-out classes)\n\n"
            body += uncertainty_table(sec)
            extra = uncertainty_paired_table(sec)
            if extra:
                body += "\n\n" + extra
        pngs: list[Path | None] = []
        if out is not None and plots:
            if experiment in ("compare", "cv"):
                pngs.append(plot_learning_curves(sec, epochs_of, out / f"{stem}.png"))
                if has_uncertainty(sec):
                    pngs.append(plot_uncertainty(sec, out / f"{stem}_uncertainty.png"))
                elif any("reliability" in r for r in sec.records):
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
