"""The ``gyrodrop`` command line: reproduce the paper's comparisons on your machine.

    gyrodrop compare --dataset digits --methods none,dropout,gyro --seeds 3
    gyrodrop sweep --dataset digits --num-subnets 16,64,256 --subnets-per-step 2,4,8
    gyrodrop diversity --dataset digits --methods dropout,gyro
    gyrodrop bench --model mlp1 --dataset fashion-mnist
    gyrodrop cv --dataset breast_cancer --folds 10
    gyrodrop report --db results.db --format markdown
    gyrodrop study data-ladder --db study.db    (a planned grid; --dry-run, --report)

Every command trains (or times) runs, saves each finished run in the SQLite file
``--db`` (default ``results.db``) and writes Markdown tables and PNG plots to ``--out``
(default ``results/``). Running a command again skips the runs already in the database,
so an interrupted command resumes where it stopped. ``--quick`` shrinks everything to a
few seconds (smoke tests, CI).

Layout: :mod:`.options` (defaults, argparse definitions, validation), :mod:`.runner`
(the shared run loop, progress, store and output), and one module per command
(:mod:`.compare`, :mod:`.sweep`, :mod:`.diversity`, :mod:`.bench`, :mod:`.cv`,
:mod:`.report`), each with ``run(args) -> exit status``.

Errors: every option is checked before any data is loaded or any run trained
(:func:`.options.validate`); a bad option, missing data or a damaged results file ends
the command with one line ``gyrodrop CMD: error: ...`` naming what is wrong and what is
allowed, exit status 2, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from gyrodrop.experiments.cli import bench, compare, cv, diversity, report, study, sweep
from gyrodrop.experiments.cli.options import CommandError, UsageError, build_parser
from gyrodrop.experiments.data import DatasetError
from gyrodrop.experiments.store import StoreError

__all__ = ["main", "build_parser", "CommandError", "COMMANDS", "USER_ERRORS"]

#: Command name -> its ``run(args)``; ``main`` dispatches through this table.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": compare.run,
    "sweep": sweep.run,
    "diversity": diversity.run,
    "bench": bench.run,
    "cv": cv.run,
    "report": report.run,
    "study": study.run,
}


#: Errors that mean bad input (options, data, results file): exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CommandError,
    DatasetError,
    StoreError,
    ValueError,
    OSError,
    sqlite3.Error,
    FloatingPointError,
)


def _error(args: argparse.Namespace, e: Exception) -> int:
    """Prints ``e`` as one line (the traceback first with ``--debug``); returns the exit
    status: 2 for :data:`USER_ERRORS`, 1 for anything else (a bug)."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    text = " ".join((str(e) or type(e).__name__).split())
    user = isinstance(e, USER_ERRORS)
    if not user:
        text = f"{type(e).__name__}: {text} (a bug? --debug shows the traceback)"
    print(f"gyrodrop {args.command}: error: {text}", file=sys.stderr)
    return 2 if user else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gyrodrop`` and ``python -m gyrodrop``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        threads = getattr(args, "threads", None)
        if threads is not None and threads < 1:
            raise UsageError(
                f"gyrodrop {args.command}: error: --threads must be an integer >= 1, got {threads}"
            )
    except UsageError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gyrodrop report | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        return _error(args, e)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
