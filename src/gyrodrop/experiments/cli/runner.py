"""The shared run loop of the ``gyrodrop`` commands: progress, data cache, configs, store.

:func:`run_all` trains every configuration not yet in the results store (in order) and
saves each when it finishes; :func:`train_and_render` wraps it with the store, the
interrupt message and the Markdown/PNG output every training command shares.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import gyrodrop
from gyrodrop.experiments.cli.options import GRID_METHODS, CommandError, check_device
from gyrodrop.experiments.data import (
    Dataset,
    data_identity,
    load_arrays,
    load_dataset,
    standardize,
    stratified_folds,
)
from gyrodrop.experiments.ood import uncertainty_run
from gyrodrop.experiments.store import Store
from gyrodrop.experiments.train import RunConfig, RunResult, input_shape, make_model, train_run

__all__ = [
    "DataCache",
    "Progress",
    "make_configs",
    "emit",
    "open_store",
    "preflight",
    "render",
    "run_all",
    "train_and_render",
    "with_data_identity",
]

# --------------------------------------------------------------------------- progress


class Progress:
    """Progress over runs and epochs: a rich bar on a terminal, one line per run on a
    non-terminal, nothing with ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.lines = not quiet and not sys.stdout.isatty()
        if not quiet and sys.stdout.isatty():
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import Progress as RichProgress
            except ImportError:
                self.lines = True
            else:
                self.bar = RichProgress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("epochs"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    console=Console(stderr=True),
                    transient=False,
                )
        self.run_index = 0
        self.runs = 0

    def note(self, text: str) -> None:
        """A line on stderr (unless quiet)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, runs: int, epochs: int) -> None:
        self.runs = runs
        if self.bar is not None and runs:
            self.bar.start()
            self.task = self.bar.add_task("runs", total=epochs)

    def run(self, cfg: RunConfig) -> Callable[[int, dict[str, float]], None]:
        self.run_index += 1
        label = f"[{self.run_index}/{self.runs}] {cfg.method}"
        if cfg.num_subnets is not None:
            label += f" σ={cfg.num_subnets} τ={cfg.subnets_per_step}"
        label += f" seed {cfg.seed}"
        if cfg.fold is not None:
            label += f" fold {cfg.fold + 1}/{cfg.folds}"
        if self.bar is not None:
            self.bar.update(self.task, description=f"{label} epoch 0/{cfg.epochs}")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if self.bar is not None:
                self.bar.update(
                    self.task,
                    advance=1,
                    description=(
                        f"{label} epoch {epoch + 1}/{cfg.epochs} "
                        f"test acc {100 * row['test_acc']:.1f}%"
                    ),
                )

        self._label = label
        return on_epoch

    def done(self, cfg: RunConfig, result: RunResult, seconds: float) -> None:
        m = result.metrics
        text = (
            f"{self._label}: test acc {100 * m['test_acc']:.2f}%, train acc "
            f"{100 * m['train_acc']:.2f}% ({seconds:.1f} s)"
        )
        if self.lines:
            print(text, file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- running


#: Image datasets the paper recipe loads raw (it standardizes each crop on its own).
RAW_IMAGES = ("fashion-mnist", "cifar10", "svhn")


class DataCache:
    """Loads each (dataset, limit, fold) once per command; image datasets raw (pixel
    values) for the paper recipe."""

    def __init__(self, data_dir: str | None) -> None:
        self.data_dir = data_dir
        self._cache: dict[tuple[Any, ...], Dataset] = {}
        self._arrays: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def __call__(self, cfg: RunConfig) -> Dataset:
        if cfg.train_size is not None:
            return self._study(cfg)
        raw = cfg.recipe == "paper" and cfg.dataset in RAW_IMAGES
        key = (cfg.dataset, cfg.limit, cfg.split_seed, cfg.folds, cfg.fold, raw)
        if key not in self._cache:
            if cfg.folds is None:
                self._cache[key] = load_dataset(
                    cfg.dataset,
                    self.data_dir,
                    limit=cfg.limit,
                    split_seed=cfg.split_seed,
                    raw=raw,
                )
            else:
                self._cache[key] = self._fold(cfg)
        return self._cache[key]

    def _study(self, cfg: RunConfig) -> Dataset:
        """A study run's nested subset (:mod:`gyrodrop.experiments.study.subsets`); only
        the latest two are kept (a study has many seeds x sizes)."""
        from gyrodrop.experiments.study.subsets import load_study_dataset

        assert cfg.train_size is not None
        akey = ("study", cfg.dataset, cfg.split_seed)
        if akey not in self._arrays:
            self._arrays[akey] = load_arrays(cfg.dataset, self.data_dir, split_seed=cfg.split_seed)
        key = ("study", cfg.dataset, cfg.train_size, cfg.val_size, cfg.seed, cfg.split_seed)
        if key not in self._cache:
            for old in [k for k in self._cache if k[0] == "study"][:-1]:
                del self._cache[old]
            self._cache[key] = load_study_dataset(
                cfg.dataset,
                self.data_dir,
                train_size=cfg.train_size,
                val_size=cfg.val_size or 1,
                seed=cfg.seed,
                split_seed=cfg.split_seed,
                arrays=self._arrays[akey],
            )
        return self._cache[key]

    def _fold(self, cfg: RunConfig) -> Dataset:
        import numpy as np

        akey = (cfg.dataset, cfg.limit, cfg.split_seed)
        if akey not in self._arrays:
            xtr, ytr, xte, yte, classes = load_arrays(
                cfg.dataset, self.data_dir, split_seed=cfg.split_seed
            )
            x = np.concatenate([xtr, xte])
            y = np.concatenate([ytr, yte])
            if cfg.limit is not None and cfg.limit < len(y):
                idx = torch.randperm(
                    len(y), generator=torch.Generator().manual_seed(cfg.split_seed)
                )
                keep = np.sort(idx[: cfg.limit].numpy())
                x, y = x[keep], y[keep]
            assert cfg.folds is not None
            try:
                folds = stratified_folds(y, cfg.folds, cfg.split_seed)
            except ValueError as e:
                raise CommandError(f"cv on {cfg.dataset}: {e}") from None
            self._arrays[akey] = (x, y, classes, folds)
        x, y, classes, folds = self._arrays[akey]
        assert cfg.fold is not None
        test = folds[cfg.fold]
        train = np.setdiff1d(np.arange(len(y)), test)
        x_train, x_test = standardize(x[train], x[test])
        num_classes = max(len(classes), int(y.max()) + 1)
        return Dataset(
            cfg.dataset,
            x_train,
            torch.from_numpy(np.array(y[train])),
            x_test,
            torch.from_numpy(np.array(y[test])),
            num_classes,
            tuple(classes),
        )


#: Seconds a claim on a run lasts without renewal (renewed after every epoch); a claim of
#: a process that died on this host is taken over at once, one on another host when
#: its lease runs out.
LEASE_SECONDS = 900.0
#: Seconds between looks at runs another process is training.
POLL_SECONDS = 2.0


def run_all(
    configs: Sequence[RunConfig],
    store: Store,
    data: DataCache,
    *,
    device: torch.device,
    progress: Progress,
    extra: Callable[[RunConfig], Callable[..., dict[str, Any]] | None] | None = None,
) -> list[str]:
    """Train every config not yet in ``store`` (in order), saving each when it finishes.

    Each run is claimed in the store before it trains (:meth:`Store.claim`), so a second
    process with the same configurations trains the others and then waits for the ones
    claimed here instead of training them twice. Returns the keys of all ``configs``.
    """
    configs = [c.normalized() for c in configs]
    keys = list(dict.fromkeys(c.key() for c in configs))
    unique = list({c.key(): c for c in configs}.values())
    done = store.finished_keys()
    pending = [c for c in unique if c.key() not in done]
    skipped = len(unique) - len(pending)
    if skipped:
        progress.note(f"{skipped} of {len(unique)} runs already in {store.path}; skipping them")
    if pending:
        data(pending[0])  # fail on missing files before anything starts
    progress.start(len(pending), sum(c.epochs for c in pending))
    said = -1
    try:
        while pending:
            waiting = []
            for cfg in pending:
                if not store.claim(cfg, LEASE_SECONDS):
                    if not store.has(cfg):  # claimed by another live process
                        waiting.append(cfg)
                    continue
                try:
                    _train_one(cfg, store, data, device, progress, extra)
                finally:
                    store.release(cfg)
            if waiting:
                if len(waiting) != said:
                    progress.note(
                        f"waiting for {len(waiting)} run(s) another process is training "
                        f"(claimed in {store.path})"
                    )
                    said = len(waiting)
                time.sleep(POLL_SECONDS)
            pending = waiting
    finally:
        progress.stop()
    return keys


def _train_one(
    cfg: RunConfig,
    store: Store,
    data: DataCache,
    device: torch.device,
    progress: Progress,
    extra: Callable[[RunConfig], Callable[..., dict[str, Any]] | None] | None,
) -> None:
    show = progress.run(cfg)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        show(epoch, row)
        store.renew(cfg, LEASE_SECONDS)

    ds = data(cfg)
    t0 = time.perf_counter()
    train = uncertainty_run if cfg.ood_classes is not None else train_run
    result = train(cfg, ds, device=device, on_epoch=on_epoch, extra=extra(cfg) if extra else None)
    result.metrics["threads"] = torch.get_num_threads()  # float sums depend on it
    result.metrics["num_classes"] = ds.num_classes
    result.metrics["n_features"] = math.prod(ds.in_shape)
    result.metrics["wall_seconds"] = time.perf_counter() - t0  # training + evaluation
    store.save(cfg, result.metrics, result.epochs, device=str(device), version=gyrodrop.__version__)
    progress.done(cfg, result, time.perf_counter() - t0)


def with_data_identity(configs: Sequence[RunConfig], data_dir: str | None) -> list[RunConfig]:
    """``configs`` with ``data_id`` set to the content hash of their data files (part of
    the run key: changed files train new runs)."""
    ids: dict[str, str | None] = {}
    out = []
    for c in configs:
        if c.dataset not in ids:
            ids[c.dataset] = data_identity(c.dataset, data_dir)
        out.append(dataclasses.replace(c, data_id=ids[c.dataset]))
    return out


def preflight(
    configs: Sequence[RunConfig],
    data: DataCache,
    inspect: Callable[[RunConfig, torch.nn.Module], None] | None = None,
) -> None:
    """Build the model of every distinct configuration on its data (no training) and
    turn what would fail or be left out later into a :class:`CommandError` now: a
    model that does not fit the data, a block-wise layer that fuses no or not every
    dropout, and whatever ``inspect(cfg, model)`` refuses."""
    seen: set[str] = set()
    for cfg in configs:
        probe = dataclasses.replace(cfg.normalized(), seed=0, fold=None if cfg.fold is None else 0)
        if probe.key() in seen:
            continue
        seen.add(probe.key())
        ds = data(cfg)
        steps = math.ceil(len(ds.y_train) / cfg.batch_size)
        what = f"--methods {cfg.method} with --model {cfg.model}"
        try:
            with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng():
                warnings.simplefilter("always")
                model = make_model(cfg, ds, steps, in_shape=input_shape(cfg, ds))
        except (ValueError, RuntimeError, TypeError) as e:
            raise CommandError(f"{what}: {e}") from e
        for w in caught:
            text = str(w.message)
            if ("dropout(s) as they were" in text) or ("model is unchanged" in text):
                hint = (
                    "; raise --p / --input-p or lower --block-size"
                    if "drop nothing" in text
                    else ""
                )
                raise CommandError(f"{what}: {text}{hint}")
        _refuse_blocks_that_drop_nothing(what, model)
        if inspect is not None:
            try:
                inspect(cfg, model)
            except ValueError as e:
                raise CommandError(str(e)) from e


def _refuse_blocks_that_drop_nothing(what: str, model: torch.nn.Module) -> None:
    """A block-wise layer whose p rounds to 0 dropped blocks trains without dropout
    while the table would say p: refused, naming the options that fix it."""
    for name, layer in model.named_modules():
        if isinstance(layer, gyrodrop.BlockGyroLinear) and layer.p > 0 and layer.n_dropped == 0:
            raise CommandError(
                f"{what}: block-wise layer {name} drops 0 of its {layer.n_blocks} block(s) "
                f"of {layer.block_size} features at p={layer.p:g}, so it would train without "
                "dropout; raise --p / --input-p or lower --block-size"
            )


def make_configs(
    cmd: str, v: dict[str, Any], methods: Sequence[str], **fixed: Any
) -> list[RunConfig]:
    """One config per method x sigma x tau x seed (sigma/tau only for the gyro family)."""
    out = []
    for method in methods:
        grid = (
            itertools.product(v["num_subnets"], v["subnets_per_step"])
            if method in GRID_METHODS
            else [(None, None)]
        )
        for sigma, tau in grid:
            if sigma is not None and tau > sigma:
                continue
            for seed in range(v["seeds"]):
                base = {
                    "experiment": cmd,
                    "dataset": v["dataset"],
                    "model": v["model"],
                    "method": method,
                    "seed": seed,
                    "epochs": v["epochs"],
                    "batch_size": v["batch_size"],
                    "lr": v["lr"],
                    "optimizer": v["optimizer"],
                    "momentum": v["momentum"],
                    "max_norm": v["max_norm"] or None,
                    "p": v["p"],
                    "input_p": v["input_p"] or None,
                    "num_subnets": sigma,
                    "subnets_per_step": tau,
                    "block_size": v["block_size"],
                    "widths": tuple(v["widths"]) if v.get("widths") else None,
                    "limit": v["limit"],
                    "recipe": v.get("recipe") or "default",
                    "width_mult": v.get("width_mult"),
                }
                base.update(fixed)
                out.append(RunConfig(**base))
    return out


def open_store(path: str, readonly: bool = False) -> Store:
    return Store(path, readonly=readonly)


def emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def render(
    cmd: str, store: Store, keys: Sequence[str], v: dict[str, Any], progress: Progress
) -> None:
    from gyrodrop.experiments import report

    out = None if v.get("no_plots") else Path(v["out"])
    methods = v.get("methods") or []
    baseline = "dropout" if "dropout" in methods else None
    text, files = report.render_experiment(
        cmd,
        store.records(keys=keys),
        store.epochs,
        out or Path(v["out"]),
        plots=out is not None,
        paired=baseline if cmd == "compare" and len(methods) > 1 else None,
    )
    emit(text)
    if files:
        progress.note("wrote " + ", ".join(str(f) for f in files))


def train_and_render(
    cmd: str,
    configs: list[RunConfig],
    v: dict[str, Any],
    extra: Callable[[RunConfig], Any] | None = None,
    *,
    prepare: Callable[[list[RunConfig], DataCache], list[RunConfig]] | None = None,
    inspect: Callable[[RunConfig, torch.nn.Module], None] | None = None,
) -> int:
    """Train ``configs`` (the ones not in ``--db`` yet) and print/write the tables.

    Order: the data files' identity, the store (refused when damaged), the data, then
    ``prepare(configs, data)`` (options checked against the data) and :func:`preflight`
    (every distinct model built once), and only then training.
    """
    if not configs:
        raise CommandError(f"{cmd}: these options select no run; nothing to do")
    progress = Progress(v.get("quiet", False))
    device = check_device(v["device"])
    data = DataCache(v.get("data_dir"))
    configs = with_data_identity(configs, v.get("data_dir"))
    with open_store(v["db"]) as store:
        if prepare is not None:
            configs = prepare(configs, data)
        done = store.finished_keys()
        preflight([c for c in configs if c.normalized().key() not in done], data, inspect)
        try:
            keys = run_all(
                configs,
                store,
                data,
                device=device,
                progress=progress,
                extra=extra,
            )
        except KeyboardInterrupt:
            n = len(store.finished_keys() & {c.normalized().key() for c in configs})
            print(
                f"\ninterrupted: {n} of {len(configs)} runs are saved in {store.path}; run the "
                "same command again to resume",
                file=sys.stderr,
            )
            return 130
        render(cmd, store, keys, v, progress)
    return 0
