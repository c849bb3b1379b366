"""``gyrodrop report``: tables and plots (Markdown), JSON or CSV from the results file."""

from __future__ import annotations

import argparse
from pathlib import Path

from gyrodrop.experiments.cli.options import check_path_given, check_writable
from gyrodrop.experiments.cli.runner import Progress, emit, open_store


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop report``; returns the exit status."""
    from gyrodrop.experiments import report

    progress = Progress(args.quiet or args.format != "markdown")
    check_path_given("--db", args.db, directory=False)
    check_path_given("--out", args.out, directory=True)
    if args.format == "markdown" and not args.no_plots:
        check_writable("--out", args.out, directory=True)
    with open_store(args.db, readonly=True) as store:
        if args.experiment == "bench":  # timings, not runs
            records = store.bench_records()
        else:
            records = store.records(experiment=args.experiment)
        if args.paired is not None:
            entries = report.paired_stats(records, args.paired)
            if not entries:
                progress.note(f"no run in {args.db} has a {args.paired} run with the same seed")
            if args.format == "json":
                emit(report.paired_json(entries))
            elif args.format == "csv":
                emit(report.paired_csv(entries))
            else:
                emit(report.paired_table(entries))
            return 0
        if args.format == "json":
            emit(report.records_json(records))
            return 0
        if args.format == "csv":
            emit(report.records_csv(records))
            return 0
        out = None if args.no_plots else Path(args.out)
        chunks = []
        files: list[Path] = []
        if args.experiment == "bench":
            names: list[str] = []  # bench timings are rendered below
        else:
            names = [args.experiment] if args.experiment else store.experiments()
        for name in names:
            text, written = report.render_experiment(
                name, records, store.epochs, out, plots=out is not None
            )
            if text:
                chunks.append(text)
            files += written
        bench = store.bench_records() if args.experiment in (None, "bench") else []
        if bench:
            text = report.bench_tables(bench)
            chunks.append("## Throughput (Figure 7, Table 7)\n\n" + text)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / "bench.md").write_text("# Throughput (Figure 7, Table 7)\n\n" + text + "\n")
                files.append(out / "bench.md")
        if not chunks:
            progress.note(f"no finished runs in {args.db}")
        emit("\n".join(chunks))
        if files:
            progress.note("wrote " + ", ".join(str(f) for f in files))
    return 0
