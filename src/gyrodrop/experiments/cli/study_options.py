"""Options of ``gyrodrop study`` (kept apart from :mod:`.options`, which defines the
other commands; this module imports nothing from the CLI so :mod:`.options` can)."""

from __future__ import annotations

import argparse
from typing import Any

from gyrodrop.experiments.train import METHODS

__all__ = ["add_study_parser", "STUDY_EXAMPLES"]

STUDY_EXAMPLES = """examples:
  gyrodrop study tiny                                  # seconds: a first look
  gyrodrop study data-ladder --dry-run                 # the plan, runs left, time estimate
  gyrodrop study data-ladder --db study.db             # train (resumable), then report
  gyrodrop study data-ladder --db study.db --seeds 3   # only seeds 0..2 (same runs)
  gyrodrop study data-ladder --db study.db --report    # the report from the database only
  gyrodrop study my-plan.toml --device cuda            # a plan file, on a GPU

Built-in plans: data-ladder, overfit-ablations, full-data, tiny. Start the same command
in a second shell to train with two processes: each claims the next run nobody trains."""


def add_study_parser(sub: Any, **kw: Any) -> argparse.ArgumentParser:
    """Adds the ``study`` sub-command to ``sub`` (an argparse sub-parsers object)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "study",
        help="a planned grid of runs (sizes x models x methods x seeds) and its report",
        description="Run a study plan (a built-in name or a .toml/.json plan file) into the "
        "results database, resumably (rerun the command to continue; no run is trained "
        "twice), then write its report: Markdown tables, a plot and JSON with paired "
        "differences against dropout (95% t interval, Wilcoxon p, Holm-corrected).",
        epilog=STUDY_EXAMPLES,
        **kw,
    )
    p.add_argument(
        "plan", metavar="PLAN", help="data-ladder, overfit-ablations, full-data, tiny or a file"
    )
    p.add_argument("--db", default="results.db", help="SQLite results file (default results.db)")
    p.add_argument(
        "--out", default="results/study", help="report directory (default results/study/)"
    )
    p.add_argument("--data-dir", help="where the image datasets' files are")
    p.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto: where to train"
    )
    p.add_argument(
        "--seeds", type=int, help="only the plan's first N seeds (the same runs, a prefix)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, the number of runs (done and left) and an estimated time "
        "from measured epoch times; train nothing",
    )
    p.add_argument("--report", action="store_true", help="only write the report from the database")
    p.add_argument(
        "--baseline",
        default="dropout",
        choices=METHODS,
        help="the method every other is paired against (default dropout)",
    )
    p.add_argument("--no-plots", action="store_true", help="no PNG plot")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    return p
