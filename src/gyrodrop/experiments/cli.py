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
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import gyrodrop
from gyrodrop.experiments.data import (
    DATASETS,
    Dataset,
    DatasetError,
    load_arrays,
    load_dataset,
    standardize,
    stratified_folds,
)
from gyrodrop.experiments.models import MODELS
from gyrodrop.experiments.store import Store, StoreError
from gyrodrop.experiments.train import (
    METHODS,
    OPTIMIZERS,
    RunConfig,
    RunResult,
    resolve_device,
    train_run,
)

__all__ = ["main", "build_parser"]

# --------------------------------------------------------------------------- defaults

#: Per-command defaults; ``--quick`` overrides them (explicit options always win).
DEFAULTS: dict[str, dict[str, Any]] = {
    "common": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 20,
        "seeds": 3,
        "batch_size": 256,
        "lr": 1e-3,
        "optimizer": "rmsprop",
        "momentum": 0.0,
        "p": 0.5,
        "num_subnets": [256],
        "subnets_per_step": [16],
        "block_size": 32,
        "mc_samples": 30,
        "limit": None,
        "input_p": None,
        "max_norm": None,
    },
    "compare": {"methods": ["none", "dropout", "gyro"]},
    "sweep": {
        "methods": ["gyro"],
        "baselines": ["dropout"],
        "seeds": 2,
        "num_subnets": [16, 64, 256, 1024],
        "subnets_per_step": [1, 2, 4, 8, 16],
    },
    "diversity": {"methods": ["dropout", "gyro"], "seeds": 1, "subnetworks": 10, "eval_size": 1000},
    "bench": {
        "methods": None,
        "dataset": "fashion-mnist",
        "model": "mlp1",
        "seeds": 1,
        "steps": 30,
        "warmup": 5,
        "layer_features": 1024,
    },
    "cv": {
        "methods": ["dropout", "gyro"],
        "dataset": "breast_cancer",
        "widths": [60, 30],
        "folds": 10,
        "seeds": 1,
        "epochs": 50,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "p": 0.2,
        "input_p": 0.2,
        "max_norm": 3.0,
        "num_subnets": [64],
        "subnets_per_step": [4],
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "common": {
        "epochs": 5,
        "seeds": 2,
        "limit": 512,
        "batch_size": 128,
        "num_subnets": [16],
        "subnets_per_step": [4],
        "mc_samples": 5,
    },
    "compare": {},
    "sweep": {"seeds": 1, "epochs": 2, "num_subnets": [8, 16], "subnets_per_step": [2, 4]},
    "diversity": {"seeds": 1, "epochs": 2, "subnetworks": 4, "eval_size": 200},
    "bench": {
        "dataset": "digits",
        "model": "mlp",
        "steps": 3,
        "warmup": 1,
        "layer_features": 256,
        "batch_size": 64,
    },
    "cv": {"folds": 3, "epochs": 10, "seeds": 1, "batch_size": 32},
}

EXAMPLES = {
    "compare": """examples:
  gyrodrop compare --quick
  gyrodrop compare --dataset digits --methods none,dropout,gyro --seeds 3 --epochs 20
  gyrodrop compare --dataset fashion-mnist --model mlp2 --methods dropout,gyro --seeds 5 --epochs 10
  gyrodrop compare --dataset cifar10 --data-dir ~/data --model alexnet --uncertainty""",
    "sweep": """examples:
  gyrodrop sweep --quick
  gyrodrop sweep --dataset digits --num-subnets 16,64,256,1024 --subnets-per-step 1,2,4,8,16
  gyrodrop sweep --dataset fashion-mnist --model mlp2 --epochs 5 \\
      --num-subnets 64,256,1024 --subnets-per-step 4,16""",
    "diversity": """examples:
  gyrodrop diversity --quick
  gyrodrop diversity --dataset digits --methods dropout,gyro --seeds 3""",
    "bench": """examples:
  gyrodrop bench --quick
  gyrodrop bench --model mlp1 --dataset fashion-mnist --methods dropout,gyro,blockwise""",
    "cv": """examples:
  gyrodrop cv --quick
  gyrodrop cv --dataset csv:sonar.csv --folds 10 --epochs 300 --batch-size 16
  gyrodrop cv --dataset breast_cancer --input-p 0 --max-norm 0  # hidden dropout only""",
    "report": """examples:
  gyrodrop report --db results.db
  gyrodrop report --db results.db --format json > runs.json
  gyrodrop report --db results.db --format csv --experiment compare""",
}


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- parsing


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def _dataset(text: str) -> str:
    if text in DATASETS or (text.startswith("csv:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"choose from {', '.join(DATASETS)} or csv:PATH, got {text!r}")


def _common(p: argparse.ArgumentParser, cmd: str) -> None:
    d = {**DEFAULTS["common"], **DEFAULTS[cmd]}
    data = p.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        type=_dataset,
        help=f"{', '.join(DATASETS)} or csv:PATH (default {d['dataset']})",
    )
    data.add_argument(
        "--data-dir",
        help="directory with the dataset files (fashion-mnist also looks in "
        "/usr/share/datasets/fashion-mnist); nothing is downloaded",
    )
    data.add_argument("--model", choices=MODELS, help=f"(default {d['model']})")
    data.add_argument(
        "--widths", type=_int_list, help="hidden FC widths, e.g. 512,512 (default: the model's)"
    )
    data.add_argument("--limit", type=int, help="use at most N train and N test examples")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, help=f"(default {d['epochs']})")
    train.add_argument("--batch-size", type=int, help=f"(default {d['batch_size']})")
    train.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']:g})")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d['optimizer']})")
    train.add_argument("--momentum", type=float, help=f"(default {d['momentum']:g})")
    train.add_argument("--seeds", type=int, help=f"number of seeds 0..N-1 (default {d['seeds']})")
    train.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    train.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice); 1 is steadier and often "
        "faster for small models on a busy machine",
    )
    reg = p.add_argument_group("regularizer")
    reg.add_argument("--p", type=float, help=f"dropout rate (default {d['p']:g})")
    reg.add_argument(
        "--num-subnets",
        type=_int_list,
        metavar="SIGMA",
        help="gyro: total subnetworks, comma list allowed "
        f"(default {','.join(map(str, d['num_subnets']))})",
    )
    reg.add_argument(
        "--subnets-per-step",
        type=_int_list,
        metavar="TAU",
        help="gyro: subnetworks trained at once, comma list allowed "
        f"(default {','.join(map(str, d['subnets_per_step']))})",
    )
    reg.add_argument("--block-size", type=int, help="blockwise: neurons per block (default 32)")
    out = p.add_argument_group("output")
    out.add_argument("--db", default="results.db", help="SQLite results file (default results.db)")
    out.add_argument(
        "--out", default="results", help="directory for tables and plots (default results/)"
    )
    out.add_argument(
        "--quick", action="store_true", help="tiny settings, seconds (smoke tests, CI)"
    )
    out.add_argument("--quiet", action="store_true", help="no progress output")
    out.add_argument("--no-plots", action="store_true", help="tables only")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="gyrodrop",
        description="Reproduce the Gyro Dropout paper's experiments: results in SQLite, "
        "Markdown tables and PNG plots.",
        epilog="example: gyrodrop compare --quick   (then: gyrodrop report --format json)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gyrodrop {gyrodrop.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    kw: dict[str, Any] = {"formatter_class": argparse.RawDescriptionHelpFormatter}

    compare = sub.add_parser(
        "compare",
        help="every method x seed: accuracy table, learning curves",
        description="Train every method with every seed; print test accuracy "
        "mean ± SD, train accuracy, generalization gap and epoch time (Tables 4, 5); "
        "plot learning curves.",
        epilog=EXAMPLES["compare"],
        **kw,
    )
    _common(compare, "compare")
    compare.add_argument(
        "--methods",
        type=_name_list(METHODS),
        help=f"comma list of {', '.join(METHODS)} (default none,dropout,gyro)",
    )
    compare.add_argument(
        "--uncertainty",
        action="store_true",
        help="also evaluate MC dropout and the gyro subnetwork ensemble "
        "(NLL, ECE, Brier, reliability diagram)",
    )
    compare.add_argument("--mc-samples", type=int, help="MC dropout samples (default 30)")

    sweep = sub.add_parser(
        "sweep",
        help="sigma x tau grid (Table 1): table and heat map",
        description="Train gyro dropout over a grid of total subnetworks (sigma) and "
        "co-scheduled subnetworks (tau), tau <= sigma; baselines once.",
        epilog=EXAMPLES["sweep"],
        **kw,
    )
    _common(sweep, "sweep")
    sweep.add_argument(
        "--methods",
        type=_name_list(("gyro", "gyro-random", "blockwise")),
        help="gridded methods (default gyro)",
    )
    sweep.add_argument(
        "--baselines",
        type=_name_list(("none", "dropout")),
        help="methods run once for reference (default dropout; '' for none)",
    )

    div = sub.add_parser(
        "diversity",
        help="feature distance among subnetworks (Figure 5)",
        description="Train dropout and gyro models, then measure the pairwise "
        "normalized L1 distance of the last hidden layer's features among "
        "subnetworks on test data.",
        epilog=EXAMPLES["diversity"],
        **kw,
    )
    _common(div, "diversity")
    div.add_argument(
        "--methods",
        type=_name_list(("dropout", "gyro", "gyro-random")),
        help="default dropout,gyro",
    )
    div.add_argument("--subnetworks", type=int, help="subnetworks compared (default 10)")
    div.add_argument("--eval-size", type=int, help="test examples used (default 1000)")

    bench = sub.add_parser(
        "bench",
        help="training throughput per method (Figure 7, Table 7)",
        description="Time training steps per method on random data of the "
        "dataset's shape, and a block-wise layer against a dense one. Always "
        "measures; results replace earlier ones of the same configuration.",
        epilog=EXAMPLES["bench"],
        **kw,
    )
    _common(bench, "bench")
    bench.add_argument(
        "--methods", type=_name_list(METHODS), help="default none,dropout,gyro(,blockwise)"
    )
    bench.add_argument("--steps", type=int, help="timed steps (default 30)")
    bench.add_argument("--warmup", type=int, help="untimed steps first (default 5)")
    bench.add_argument("--layer-features", type=int, help="block-wise layer width (default 1024)")
    bench.add_argument("--no-layer", action="store_true", help="skip the block-wise layer table")

    cv = sub.add_parser(
        "cv",
        help="stratified k-fold cross-validation, dropout vs gyro",
        description="Stratified k-fold cross-validation (the tutorial's workflow): "
        "dropout on inputs and hidden layers, max-norm weight constraint, SGD with "
        "momentum; mean ± SD over folds.",
        epilog=EXAMPLES["cv"],
        **kw,
    )
    _common(cv, "cv")
    cv.add_argument("--methods", type=_name_list(METHODS), help="default dropout,gyro")
    cv.add_argument("--folds", type=int, help="k (default 10)")
    cv.add_argument(
        "--input-p", type=float, help="dropout rate on the inputs (default 0.2; 0 = none)"
    )
    cv.add_argument(
        "--max-norm", type=float, help="max L2 norm of each unit's weights (default 3; 0 = none)"
    )

    report = sub.add_parser(
        "report",
        help="tables and plots from the database",
        description="Re-render tables and plots from the results database; "
        "print Markdown, JSON (one record per finished run) or CSV.",
        epilog=EXAMPLES["report"],
        **kw,
    )
    report.add_argument(
        "--db", default="results.db", help="SQLite results file (default results.db)"
    )
    report.add_argument(
        "--out", default="results", help="directory for tables and plots (default results/)"
    )
    report.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown")
    report.add_argument(
        "--experiment",
        choices=("compare", "sweep", "diversity", "cv", "bench"),
        help="only this experiment (default all)",
    )
    report.add_argument("--no-plots", action="store_true", help="do not write files to --out")
    report.add_argument("--quiet", action="store_true", help="no notes on stderr")
    return parser


def _resolve(args: argparse.Namespace, cmd: str) -> dict[str, Any]:
    """Option values: explicit > --quick defaults > command defaults."""
    values = {**DEFAULTS["common"], **DEFAULTS[cmd]}
    if getattr(args, "quick", False):
        values.update(QUICK["common"])
        values.update(QUICK[cmd])
    for k, v in vars(args).items():
        if v is not None:
            values[k] = v
    return values


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


class DataCache:
    """Loads each (dataset, limit, fold) once per command."""

    def __init__(self, data_dir: str | None) -> None:
        self.data_dir = data_dir
        self._cache: dict[tuple[Any, ...], Dataset] = {}
        self._arrays: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def __call__(self, cfg: RunConfig) -> Dataset:
        key = (cfg.dataset, cfg.limit, cfg.split_seed, cfg.folds, cfg.fold)
        if key not in self._cache:
            if cfg.folds is None:
                self._cache[key] = load_dataset(
                    cfg.dataset, self.data_dir, limit=cfg.limit, split_seed=cfg.split_seed
                )
            else:
                self._cache[key] = self._fold(cfg)
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
    Returns the keys of all ``configs``."""
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
    try:
        for cfg in pending:
            if store.has(cfg):  # finished meanwhile by another process
                continue
            on_epoch = progress.run(cfg)
            t0 = time.perf_counter()
            result = train_run(
                cfg,
                data(cfg),
                device=device,
                on_epoch=on_epoch,
                extra=extra(cfg) if extra else None,
            )
            result.metrics["threads"] = torch.get_num_threads()  # float sums depend on it
            store.save(
                cfg, result.metrics, result.epochs, device=str(device), version=gyrodrop.__version__
            )
            progress.done(cfg, result, time.perf_counter() - t0)
    finally:
        progress.stop()
    return keys


def _configs(cmd: str, v: dict[str, Any], methods: Sequence[str], **fixed: Any) -> list[RunConfig]:
    """One config per method x sigma x tau x seed (sigma/tau only for the gyro family)."""
    out = []
    for method in methods:
        grid = (
            itertools.product(v["num_subnets"], v["subnets_per_step"])
            if method in ("gyro", "gyro-random", "blockwise")
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
                }
                base.update(fixed)
                out.append(RunConfig(**base))
    return out


def _check(v: dict[str, Any]) -> None:
    for name in ("epochs", "seeds", "batch_size"):
        if v.get(name) is not None and int(v[name]) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {v[name]}")
    if v.get("limit") is not None and v["limit"] < 2:
        raise CommandError(f"--limit must be >= 2, got {v['limit']}")
    if not 0.0 <= v["p"] < 1.0:
        raise CommandError(f"--p must be in [0, 1), got {v['p']}")
    if "blockwise" in (v.get("methods") or []) and not hasattr(gyrodrop, "apply_block_gyro"):
        raise CommandError(
            "method blockwise needs gyrodrop.apply_block_gyro, which this version of "
            "gyrodrop does not have; leave blockwise out of --methods"
        )
    for t in v["subnets_per_step"]:
        if t > v["batch_size"]:
            raise CommandError(
                f"--subnets-per-step {t} is larger than --batch-size {v['batch_size']}"
            )


def _open_store(path: str, readonly: bool = False) -> Store:
    return Store(path, readonly=readonly)


def _emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _render(
    cmd: str, store: Store, keys: Sequence[str], v: dict[str, Any], progress: Progress
) -> None:
    from gyrodrop.experiments import report

    out = None if v.get("no_plots") else Path(v["out"])
    text, files = report.render_experiment(
        cmd, store.records(keys=keys), store.epochs, out or Path(v["out"]), plots=out is not None
    )
    _emit(text)
    if files:
        progress.note("wrote " + ", ".join(str(f) for f in files))


# --------------------------------------------------------------------------- commands


def cmd_compare(args: argparse.Namespace) -> int:
    v = _resolve(args, "compare")
    _check(v)
    mc = v["mc_samples"] if v.get("uncertainty") else None
    configs = _configs("compare", v, v["methods"], mc_samples=mc)
    return _train_and_render("compare", configs, v)


def _train_and_render(
    cmd: str,
    configs: list[RunConfig],
    v: dict[str, Any],
    extra: Callable[[RunConfig], Any] | None = None,
) -> int:
    progress = Progress(v.get("quiet", False))
    device = resolve_device(v["device"])
    with _open_store(v["db"]) as store:
        try:
            keys = run_all(
                configs,
                store,
                DataCache(v.get("data_dir")),
                device=device,
                progress=progress,
                extra=extra,
            )
        except KeyboardInterrupt:
            n = len(store.finished_keys() & {c.key() for c in configs})
            print(
                f"\ninterrupted: {n} of {len(configs)} runs are saved in {store.path}; run the "
                "same command again to resume",
                file=sys.stderr,
            )
            return 130
        _render(cmd, store, keys, v, progress)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    v = _resolve(args, "sweep")
    _check(v)
    configs = _configs("sweep", v, v["baselines"]) + _configs("sweep", v, v["methods"])
    return _train_and_render("sweep", configs, v)


def cmd_diversity(args: argparse.Namespace) -> int:
    from gyrodrop.experiments.analysis import diversity

    v = _resolve(args, "diversity")
    _check(v)
    if v["subnetworks"] < 2:
        raise CommandError(f"--subnetworks must be >= 2, got {v['subnetworks']}")
    if v["model"] == "resnet18":
        raise CommandError(
            "diversity: resnet18 has no dropout before its last hidden layer; "
            "use mlp, mlp1, mlp2, lenet or alexnet"
        )
    if v.get("widths") is not None and len(v["widths"]) < 2 and v["model"].startswith("mlp"):
        raise CommandError(
            "diversity: an mlp needs >= 2 hidden layers (--widths A,B) so that "
            "subnetworks differ before the last hidden layer"
        )
    configs = _configs("diversity", v, v["methods"])

    def extra(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
        return lambda model, data: diversity(
            model, data, count=v["subnetworks"], eval_size=v["eval_size"], seed=cfg.seed
        )

    return _train_and_render("diversity", configs, v, extra)


def cmd_cv(args: argparse.Namespace) -> int:
    v = _resolve(args, "cv")
    _check(v)
    if v["folds"] < 2:
        raise CommandError(f"--folds must be >= 2, got {v['folds']}")
    if v["input_p"] and not v["model"].startswith("mlp"):
        raise CommandError("cv: --input-p needs an mlp model (or pass --input-p 0)")
    if v["input_p"] and not 0.0 <= v["input_p"] < 1.0:
        raise CommandError(f"--input-p must be in [0, 1), got {v['input_p']}")
    configs = []
    for fold in range(v["folds"]):
        configs += _configs("cv", v, v["methods"], folds=v["folds"], fold=fold)
    return _train_and_render("cv", configs, v)


_SHAPES = {
    "digits": ((64,), 10),
    "breast_cancer": ((30,), 2),
    "wine": ((13,), 3),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "svhn": ((3, 32, 32), 10),
}


def cmd_bench(args: argparse.Namespace) -> int:
    from gyrodrop.experiments import report
    from gyrodrop.experiments.analysis import time_block_layer, time_train_steps

    v = _resolve(args, "bench")
    methods = v["methods"] or ["none", "dropout", "gyro"] + (
        ["blockwise"] if hasattr(gyrodrop, "apply_block_gyro") else []
    )
    v["methods"] = methods
    _check(v)
    device = resolve_device(v["device"])
    progress = Progress(v.get("quiet", False))
    if v["dataset"] in _SHAPES:
        in_shape, num_classes = _SHAPES[v["dataset"]]
    else:
        ds = load_dataset(v["dataset"], v.get("data_dir"), limit=16)
        in_shape, num_classes = ds.in_shape, ds.num_classes
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with _open_store(v["db"]) as store:
        configs = _configs("bench", {**v, "seeds": 1}, methods)
        progress.note(
            f"timing {v['model']}: {', '.join(c.method for c in configs)} "
            f"({v['steps']} interleaved steps each)"
        )
        timings = time_train_steps(
            configs,
            tuple(in_shape),
            num_classes,
            steps=v["steps"],
            warmup=v["warmup"],
            device=device,
        )
        for cfg, m in zip(configs, timings, strict=False):
            conf = dict(
                dataset=cfg.dataset,
                model=cfg.model,
                method=cfg.method,
                batch_size=cfg.batch_size,
                num_subnets=cfg.num_subnets,
                subnets_per_step=cfg.subnets_per_step,
                block_size=cfg.block_size,
                widths=list(cfg.widths) if cfg.widths else None,
                **env,
            )
            store.save_bench("train_step", conf, m)
        layer_ok = hasattr(gyrodrop, "BlockGyroLinear") and not v.get("no_layer")
        if not layer_ok and not v.get("no_layer"):
            progress.note(
                "note: gyrodrop.BlockGyroLinear is not available; block-wise layer table skipped"
            )
        if layer_ok:
            for drop in (0.1, 0.25, 0.5, 0.75):
                progress.note(f"timing block-wise layer, drop {drop:.0%}")
                m = time_block_layer(
                    drop,
                    features=v["layer_features"],
                    batch_size=v["batch_size"],
                    block_size=v["block_size"],
                    steps=v["steps"],
                    warmup=v["warmup"],
                    device=device,
                )
                conf = dict(
                    drop=drop,
                    features=v["layer_features"],
                    batch_size=v["batch_size"],
                    block_size=v["block_size"],
                    **env,
                )
                store.save_bench("block_layer", conf, m)
        text = report.bench_tables(store.bench_records())
    _emit("## Throughput (Figure 7, Table 7)\n\n" + text)
    if not v.get("no_plots"):
        out = Path(v["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text("# Throughput (Figure 7, Table 7)\n\n" + text + "\n")
        progress.note(f"wrote {out / 'bench.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gyrodrop.experiments import report

    progress = Progress(args.quiet or args.format != "markdown")
    with _open_store(args.db, readonly=True) as store:
        if args.experiment == "bench":  # timings, not runs
            records = store.bench_records()
        else:
            records = store.records(experiment=args.experiment)
        if args.format == "json":
            _emit(report.records_json(records))
            return 0
        if args.format == "csv":
            _emit(report.records_csv(records))
            return 0
        out = None if args.no_plots else Path(args.out)
        chunks = []
        files: list[Path] = []
        names = [args.experiment] if args.experiment else store.experiments()
        for name in names:
            if name == "bench":
                break
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
        _emit("\n".join(chunks))
        if files:
            progress.note("wrote " + ", ".join(str(f) for f in files))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "diversity": cmd_diversity,
    "bench": cmd_bench,
    "cv": cmd_cv,
    "report": cmd_report,
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
