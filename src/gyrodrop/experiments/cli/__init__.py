"""The ``gyrodrop`` command line: reproduce the paper's comparisons on your machine.

    gyrodrop compare --dataset digits --methods none,dropout,gyro --seeds 3
    gyrodrop sweep --dataset digits --num-subnets 16,64,256 --subnets-per-step 2,4,8
    gyrodrop diversity --dataset digits --methods dropout,gyro
    gyrodrop bench --model mlp1 --dataset fashion-mnist
    gyrodrop cv --dataset breast_cancer --folds 10
    gyrodrop report --db results.db --format markdown

Every command trains (or times) runs, saves each finished run in the SQLite file
``--db`` (default ``results.db``) and writes Markdown tables and PNG plots to ``--out``
(default ``results/``). Running a command again skips the runs already in the database,
so an interrupted command resumes where it stopped. ``--quick`` shrinks everything to a
few seconds (smoke tests, CI).

Layout: :mod:`.options` (defaults, argparse definitions, validation), :mod:`.runner`
(the shared run loop, progress, store and output), and one module per command
(:mod:`.compare`, :mod:`.sweep`, :mod:`.diversity`, :mod:`.bench`, :mod:`.cv`,
:mod:`.report`), each with ``run(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

from gyrodrop.experiments.cli import bench, compare, cv, diversity, report, sweep
from gyrodrop.experiments.cli.options import CommandError, build_parser
from gyrodrop.experiments.data import DatasetError
from gyrodrop.experiments.store import StoreError

__all__ = ["main", "build_parser", "CommandError", "COMMANDS"]

#: Command name -> its ``run(args)``; ``main`` dispatches through this table.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": compare.run,
    "sweep": sweep.run,
    "diversity": diversity.run,
    "bench": bench.run,
    "cv": cv.run,
    "report": report.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gyrodrop`` and ``python -m gyrodrop``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return COMMANDS[args.command](args)
    except (CommandError, DatasetError, StoreError) as e:
        print(f"gyrodrop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gyrodrop report | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
