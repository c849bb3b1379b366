"""``gyrodrop study PLAN``: a planned grid of runs into the results database, then the
study report (:mod:`gyrodrop.experiments.study`).

Order: the plan is parsed and checked (a bad plan is refused in one line, exit 2),
then the data's size is checked against the plan's sizes, the store opened, every
distinct model built once (:func:`~.runner.preflight`), and only then training. The
runs are trained seed-major with claims in the store (:func:`~.runner.run_all`):
rerun the command to resume, start it twice to train with two processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gyrodrop.experiments.cli.options import CommandError, check_device, check_path_given
from gyrodrop.experiments.cli.runner import (
    DataCache,
    Progress,
    emit,
    open_store,
    preflight,
    run_all,
    with_data_identity,
)
from gyrodrop.experiments.data import load_arrays
from gyrodrop.experiments.store import Store
from gyrodrop.experiments.study.plan import (
    Plan,
    PlanError,
    check_sizes,
    expand,
    load_plan,
    with_seeds,
)
from gyrodrop.experiments.train import RunConfig, RunResult

__all__ = ["run", "estimate_seconds", "STEP_SECONDS"]

#: Seconds per optimizer step (batch 128, one thread, training and the study's
#: evaluations included) measured on the project's shared 2-core machine; the
#: estimate's fallback before the database holds a finished run of the model.
STEP_SECONDS: dict[str, float] = {"mlp": 0.004, "mlp1": 0.02, "mlp2": 0.03, "lenet": 0.06}


def _steps(cfg: RunConfig, n: int | None = None) -> int:
    if cfg.steps_per_epoch is not None:
        return cfg.epochs * cfg.steps_per_epoch
    size = n or cfg.train_size or 1000
    return cfg.epochs * -(-size // cfg.batch_size)


def estimate_seconds(
    configs: Sequence[RunConfig], finished: Sequence[dict[str, Any]]
) -> tuple[float, int]:
    """Estimated seconds to train ``configs`` one after the other, and how many of the
    runs were estimated from the database: per run the median ``wall_seconds`` per step
    of finished runs of the same model, method and size (else model and method, else
    model) times its steps; else :data:`STEP_SECONDS` per step."""
    rate: dict[tuple[Any, ...], list[float]] = {}
    for r in finished:
        secs, steps = r.get("wall_seconds"), r.get("steps")
        if not isinstance(secs, (int, float)) or not steps:
            continue
        per_step = secs / steps
        for k in (
            (r["model"], r["method"], r.get("train_size")),
            (r["model"], r["method"]),
            (r["model"],),
        ):
            rate.setdefault(k, []).append(per_step)
    total, measured = 0.0, 0
    for c in configs:
        for k in ((c.model, c.method, c.train_size), (c.model, c.method), (c.model,)):
            if k in rate:
                total += statistics.median(rate[k]) * _steps(c)
                measured += 1
                break
        else:
            total += STEP_SECONDS.get(c.model, 0.1) * _steps(c)
    return total, measured


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _StudyProgress(Progress):
    """:class:`Progress` with an ETA on every run's line (log files), from the mean
    wall time of this process's runs so far."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet)
        self.t_start = time.perf_counter()

    def done(self, cfg: RunConfig, result: RunResult, seconds: float) -> None:
        m = result.metrics
        elapsed = time.perf_counter() - self.t_start
        left = (self.runs - self.run_index) * elapsed / max(self.run_index, 1)
        text = (
            f"{self._label} {cfg.model} n={cfg.train_size}: test acc {100 * m['test_acc']:.2f}%, "
            f"train acc {100 * m['train_acc']:.2f}% ({seconds:.0f} s; this process: "
            f"{self.run_index}/{self.runs}, ETA {_hms(left)})"
        )
        if self.lines:
            print(text, file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)


def _plan(args: argparse.Namespace) -> Plan:
    try:
        plan = load_plan(args.plan)
    except PlanError as e:
        raise CommandError(str(e)) from None
    if args.seeds is not None:
        if args.seeds < 1:
            raise CommandError(f"--seeds must be an integer >= 1, got {args.seeds}")
        plan = with_seeds(plan, args.seeds)
    return plan


def _diversity_extra(cfg: RunConfig) -> Callable[..., dict[str, Any]] | None:
    if cfg.subnetworks is None or cfg.eval_size is None:
        return None
    from gyrodrop.experiments.analysis import diversity

    count, size, seed = cfg.subnetworks, cfg.eval_size, cfg.seed
    return lambda model, data: diversity(model, data, count=count, eval_size=size, seed=seed)


def _inspect(cfg: RunConfig, model: nn.Module) -> None:
    if cfg.subnetworks is not None:
        from gyrodrop.experiments.analysis import subnetwork_steps

        try:
            subnetwork_steps(model, cfg.subnetworks)
        except ValueError as e:
            raise CommandError(
                f"diversity subnetworks {cfg.subnetworks} too many for {cfg.method}: {e}"
            ) from e


def _report(plan: Plan, store: Store, keys: Sequence[str], args: argparse.Namespace) -> None:
    from gyrodrop.experiments.study.report import write_report

    out = Path(args.out)
    text, files = write_report(
        plan, store, keys, out, baseline=args.baseline, plots=not args.no_plots, db=args.db
    )
    emit(text)
    if files and not args.quiet:
        print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop study``; returns the exit status."""
    plan = _plan(args)
    check_path_given("--db", args.db, directory=False)
    check_path_given("--out", args.out, directory=True)
    device = check_device(args.device)
    arrays = load_arrays(plan.dataset, args.data_dir, split_seed=plan.split_seed)
    try:
        check_sizes(plan, len(arrays[1]))
    except PlanError as e:
        raise CommandError(str(e)) from None
    configs = with_data_identity(expand(plan), args.data_dir)
    if args.report:
        with open_store(args.db, readonly=True) as store:
            _report(plan, store, [c.key() for c in configs], args)
        return 0
    if args.dry_run:
        finished: list[dict[str, Any]] = []
        done: set[str] = set()
        if Path(args.db).exists():
            with open_store(args.db, readonly=True) as store:
                finished = store.records(experiment="study")
                done = store.finished_keys()
        pending = [c for c in configs if c.key() not in done]
        secs, measured = estimate_seconds(pending, finished)
        emit(plan.summary())
        emit(
            f"runs: {len(configs)} ({len(configs) - len(pending)} already in {args.db}, "
            f"{len(pending)} to train)"
        )
        emit(
            f"estimated time: {_hms(secs)} with one process, {_hms(secs / 2)} with two "
            f"(one thread each; {measured} of {len(pending)} runs from the wall time of "
            "finished runs in the database, the others from STEP_SECONDS, measured on a "
            "shared 2-core CPU)"
        )
        return 0
    progress = _StudyProgress(args.quiet)
    data = DataCache(args.data_dir)
    with open_store(args.db) as store:
        done = store.finished_keys()
        preflight([c for c in configs if c.key() not in done], data, _inspect)
        try:
            keys = run_all(
                configs, store, data, device=device, progress=progress, extra=_diversity_extra
            )
        except KeyboardInterrupt:
            n = len(store.finished_keys() & {c.key() for c in configs})
            print(
                f"\ninterrupted: {n} of {len(configs)} runs are saved in {store.path}; run the "
                "same command again to resume",
                file=sys.stderr,
            )
            return 130
        _report(plan, store, keys, args)
    return 0
