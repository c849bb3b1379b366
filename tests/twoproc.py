"""Run a test's worker on gloo ranks in spawned processes and collect what each rank
saved: the scaffolding shared by the multi-process tests (test_distributed*.py).

A worker is ``worker(rank, store, out)``: it joins the group through the file
``store`` and saves its results with :func:`save_rank` into the folder ``out``.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp


def save_rank(out: str, rank: int, results: dict[str, Any]) -> None:
    """The worker's results, for :func:`run_ranks` to collect."""
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def run_ranks(
    worker: Callable[[int, str, str], None], tmp: Path, world: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Every rank's saved results, in rank order; the test fails (instead of hanging)
    when the ranks have not finished within ``timeout_s`` seconds."""
    ctx = mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} gloo ranks did not finish within {timeout_s:g} s")
    out = []
    for r in range(world):
        with open(tmp / f"rank{r}.pkl", "rb") as f:
            out.append(pickle.load(f))
    return out
