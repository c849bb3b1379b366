"""Options of the ``gyrodrop`` command line: defaults, argparse definitions, resolving.

Every command's options are defined here (:func:`build_parser`; ``study``'s in
:mod:`.study_options`); the per-command modules (:mod:`.compare`, ...) only run them.
Option values resolve as explicit > ``--quick`` defaults > command defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

import gyrodrop
from gyrodrop.experiments.cli.defaults import DEFAULTS, EXAMPLES, PAPER, QUICK
from gyrodrop.experiments.cli.layer_options import layer_option_error
from gyrodrop.experiments.cli.ood_options import add_ood_options
from gyrodrop.experiments.cli.study_options import add_study_parser
from gyrodrop.experiments.data import DATASETS
from gyrodrop.experiments.models import MODELS, PAPER_CONV
from gyrodrop.experiments.train import METHODS, OPTIMIZERS, RECIPES

__all__ = [
    "DEFAULTS",
    "QUICK",
    "PAPER",
    "EXAMPLES",
    "CommandError",
    "GRID_METHODS",
    "UsageError",
    "build_parser",
    "check_device",
    "check_writable",
    "resolve",
    "validate",
]

#: Drop rates of bench's block-wise layer table.
LAYER_DROPS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)

#: Methods trained over the sigma x tau grid (a fixed set of subnetworks).
GRID_METHODS: tuple[str, ...] = ("gyro", "gyro-random", "gyro-independent", "blockwise")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


class UsageError(Exception):
    """An option argparse cannot parse; ``str()`` is the whole line
    (``gyrodrop CMD: error: ...``)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one line, no usage
    block; ``--help`` shows the usage); :func:`~gyrodrop.experiments.cli.main` prints it
    and returns exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


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
    if cmd in ("compare", "sweep", "diversity"):
        _recipe(train)
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
    _debug(out)


def _recipe(train: Any) -> None:
    train.add_argument(
        "--recipe",
        choices=RECIPES,
        help="default (this project's): standardized features, constant learning rate; "
        "paper: the authors' (TF1-style RMSProp lr 0.007, decay 0.9, momentum 0.9, "
        "epsilon 1; lr x0.1 at 40%% and 80%% of the epochs; batch 256; --model paper-mlp; "
        "per-image standardization; random 24x24 crop + flip, center crop at test)",
    )
    train.add_argument(
        "--width-mult",
        type=float,
        help="conv channel multiplier of paper-lenet / paper-alexnet (default 1: the "
        "authors' widths; e.g. 0.25 for a CPU)",
    )


def _debug(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (all sub-commands)."""
    parser = OneLineParser(
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
    add_ood_options(compare)

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
        type=_name_list(GRID_METHODS),
        help=f"gridded methods: {', '.join(GRID_METHODS)} (default gyro)",
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
    report.add_argument("--db", default="results.db", help="SQLite results file")
    report.add_argument("--out", default="results", help="directory for tables and plots")
    report.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown")
    report.add_argument(
        "--experiment",
        choices=("compare", "sweep", "diversity", "cv", "bench"),
        help="only this experiment (default all)",
    )
    report.add_argument(
        "--paired",
        metavar="BASELINE",
        choices=METHODS,
        help="instead of the tables: every method against BASELINE (e.g. dropout), paired "
        "by seed: n, mean difference, 95%% t interval, Wilcoxon signed-rank p; for the "
        'final and the best-epoch test accuracy (JSON: {"paired": [...]}, fractions)',
    )
    report.add_argument("--no-plots", action="store_true", help="do not write files to --out")
    report.add_argument("--quiet", action="store_true", help="no notes on stderr")
    _debug(report)
    add_study_parser(sub, **kw)
    return parser


def resolve(args: argparse.Namespace, cmd: str) -> dict[str, Any]:
    """Option values: explicit > --quick defaults > command defaults."""
    values = {**DEFAULTS["common"], **DEFAULTS[cmd]}
    if getattr(args, "recipe", None) == "paper":
        values.update(PAPER)
    values.setdefault("recipe", "default")
    if getattr(args, "quick", False):
        values.update(QUICK["common"])
        values.update(QUICK[cmd])
    explicit = set()
    for k, v in vars(args).items():
        if v is not None:
            values[k] = v
            explicit.add(k)
    values["explicit"] = explicit
    return values


# --------------------------------------------------------------------------- validation


def _fail(option: str, allowed: str, value: Any) -> NoReturn:
    raise CommandError(f"{option} must be {allowed}, got {value!r}")


def _int_at_least(v: dict[str, Any], name: str, low: int) -> None:
    value = v.get(name)
    if value is not None and int(value) < low:
        _fail("--" + name.replace("_", "-"), f"an integer >= {low}", value)


def _finite(v: dict[str, Any], name: str, allowed: str, ok: Callable[[float], bool]) -> None:
    value = v.get(name)
    if value is not None and not (math.isfinite(value) and ok(value)):
        _fail("--" + name.replace("_", "-"), allowed, value)


def check_device(text: str) -> torch.device:
    """``--device`` as a :class:`torch.device` that exists on this machine ("auto": cuda
    when present, else cpu); :class:`CommandError` otherwise."""
    allowed = "cpu, cuda, cuda:N (N < the number of GPUs) or auto"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        _fail("--device", allowed, text)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        _fail("--device", allowed, text)
    if not torch.cuda.is_available():
        raise CommandError(f"--device {text}: CUDA is not available on this machine; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CommandError(
            f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def check_path_given(option: str, path: str | Path, *, directory: bool) -> None:
    """:class:`CommandError` when ``path`` is empty (or only spaces): ``Path("")`` is
    the current folder, so an empty ``--out`` would write there and an empty ``--db``
    would name a folder."""
    if not str(path).strip():
        what = "a folder for tables and plots" if directory else "a results file path"
        raise CommandError(f"{option} is empty; pass {what}")


def check_writable(option: str, path: str | Path, *, directory: bool) -> None:
    """:class:`CommandError` unless ``path`` can be written (as a directory with
    ``directory``, else as a file): an existing path must be of that kind and writable,
    a missing one needs its nearest existing parent to be a writable directory. Creates
    nothing (a probe file in that parent is removed at once)."""
    kind = "a directory" if directory else "a file"
    check_path_given(option, path, directory=directory)
    p = Path(path).expanduser()
    if p.exists():
        if directory and not p.is_dir():
            raise CommandError(f"{option} {path}: exists and is not a directory; pass a folder")
        if not directory and not p.is_file():
            raise CommandError(f"{option} {path}: exists and is not a file; pass a file path")
        probe_dir = p if directory else p.parent
        if not directory and not os.access(p, os.W_OK):
            raise CommandError(f"{option} {path}: not writable; pass {kind} you can write")
    else:
        probe_dir = p.parent
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise CommandError(
                f"{option} {path}: {probe_dir} is not a directory; pass {kind} under a folder"
            )
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise CommandError(
            f"{option} {path}: cannot write in {probe_dir} ({e.strerror}); pass {kind} "
            "you can write"
        ) from None


def _check_methods(cmd: str, v: dict[str, Any]) -> None:
    if not v["methods"]:
        if cmd == "sweep":
            raise CommandError(
                "--methods is empty; choose one or more of gyro, gyro-random, blockwise"
            )
        raise CommandError(f"--methods is empty; choose one or more of {', '.join(METHODS)}")
    grid = [m for m in v["methods"] if m in GRID_METHODS]
    needs_p = [m for m in v["methods"] if m != "none"]
    if needs_p and v["p"] == 0 and not v.get("input_p"):
        raise CommandError(
            f"--p must be in (0, 1) for method(s) {', '.join(needs_p)}, got 0 "
            "(p = 0 builds no dropout layer to regularize)"
        )
    given = [f"--{n.replace('_', '-')}" for n in ("num_subnets", "subnets_per_step")]
    given = [
        g
        for g, n in zip(given, ("num_subnets", "subnets_per_step"), strict=True)
        if n in v.get("explicit", ())
    ]
    if not grid and given:
        raise CommandError(
            f"{' and '.join(given)} set the gyro subnetworks, but --methods "
            f"{','.join(v['methods'])} has no gyro or blockwise method; add one or drop "
            f"{' and '.join(given)}"
        )
    if not grid:
        return
    pairs = [(s, t) for s in v["num_subnets"] for t in v["subnets_per_step"]]
    if cmd == "sweep":
        if not any(t <= s for s, t in pairs):
            raise CommandError(
                "sweep: every --subnets-per-step (tau) is larger than every --num-subnets "
                f"(sigma) ({v['subnets_per_step']} vs {v['num_subnets']}); nothing to run"
            )
    else:
        for s, t in pairs:
            if t > s:
                raise CommandError(
                    f"--subnets-per-step must be <= --num-subnets (tau <= sigma), got "
                    f"tau {t} > sigma {s}"
                )
    for t in v["subnets_per_step"]:
        if t > v["batch_size"]:
            raise CommandError(
                f"--subnets-per-step {t} is larger than --batch-size {v['batch_size']}; "
                "each of the tau subnetworks needs at least one example per batch"
            )
    if "blockwise" in v["methods"]:
        _check_blocks(v)


def _check_blocks(v: dict[str, Any]) -> None:
    """Block-wise: every masked width must have more blocks than dropout drops."""
    from gyrodrop.blockwise import n_dropped_blocks
    from gyrodrop.experiments.models import DEFAULT_WIDTHS

    block = v["block_size"]
    widths = v.get("widths") or DEFAULT_WIDTHS.get(v["model"])
    if not widths or not v["model"].startswith("mlp"):
        return  # conv models: checked when the model is built (before training)
    p = v["p"]

    def fits(width: int, size: int) -> bool:
        n_blocks = -(-width // size)
        return bool(n_dropped_blocks(p, n_blocks) < n_blocks)

    for w in widths:
        if not fits(int(w), block):
            best = next((b for b in range(int(w), 0, -1) if fits(int(w), b)), None)
            hint = f"use --block-size <= {best}" if best else "lower --p"
            raise CommandError(
                f"--block-size {block} is too large for hidden width {w} at --p {p:g} "
                f"(every block would be dropped); {hint} or wider --widths"
            )
        n_blocks = -(-int(w) // block)
        if p > 0 and n_dropped_blocks(p, n_blocks) == 0:
            raise CommandError(
                f"--p {p:g} drops no block at hidden width {w} ({n_blocks} blocks of "
                f"--block-size {block}): the run would have no dropout; raise --p to >= "
                f"{0.5 / n_blocks:g} or lower --block-size"
            )


def validate(cmd: str, v: dict[str, Any]) -> None:
    """Every option of training command ``cmd`` checked before any data is loaded or any
    run trained. Raises :class:`CommandError` naming the option and what is allowed."""
    for name in ("epochs", "seeds", "batch_size", "threads"):
        _int_at_least(v, name, 1)
    if (refused := layer_option_error(v)) is not None:
        raise CommandError(refused)
    _int_at_least(v, "limit", 2)
    _finite(v, "lr", "a finite number > 0", lambda x: x > 0)
    _finite(v, "momentum", "a finite number in [0, 1)", lambda x: 0 <= x < 1)
    _finite(v, "input_p", "a finite number in [0, 1) (0 = none)", lambda x: 0 <= x < 1)
    _finite(v, "max_norm", "a finite number >= 0 (0 = none)", lambda x: x >= 0)
    _finite(v, "width_mult", "a finite number > 0", lambda x: x > 0)
    if v.get("width_mult") is not None and v["model"] not in PAPER_CONV:
        raise CommandError(
            f"--width-mult applies to --model {' or '.join(PAPER_CONV)}, got --model {v['model']}"
        )
    if v.get("input_p") and not v["model"].startswith("mlp"):
        raise CommandError(
            f"--input-p needs an mlp model (got --model {v['model']}); pass --input-p 0"
        )
    if v.get("data_dir") is not None and not Path(v["data_dir"]).expanduser().is_dir():
        raise CommandError(f"--data-dir {v['data_dir']}: not a directory")
    if v["dataset"].startswith("csv:") and not Path(v["dataset"][4:]).expanduser().is_file():
        raise CommandError(f"--dataset {v['dataset']}: no such file")
    _check_methods(cmd, v)
    if cmd == "compare":
        _int_at_least(v, "mc_samples", 1)
        if "mc_samples" in v["explicit"] and not v.get("uncertainty"):
            raise CommandError("--mc-samples needs --uncertainty (it sets the MC dropout samples)")
        if v.get("uncertainty") and all(m == "none" for m in v["methods"]):
            raise CommandError(
                "--uncertainty needs a method with dropout (MC dropout samples it); "
                "--methods none has none: add dropout, gyro, ... or drop --uncertainty"
            )
    elif cmd == "diversity":
        _int_at_least(v, "subnetworks", 2)
        _int_at_least(v, "eval_size", 1)
        if v["model"] == "resnet18":
            raise CommandError(
                "--model resnet18 has no dropout before its last hidden layer; "
                "diversity needs mlp, mlp1, mlp2, lenet or alexnet"
            )
        if v.get("widths") is not None and len(v["widths"]) < 2 and v["model"].startswith("mlp"):
            raise CommandError(
                "--widths needs >= 2 hidden layers for diversity (A,B) so that "
                "subnetworks differ before the last hidden layer"
            )
        grid = [m for m in v["methods"] if m in GRID_METHODS]
        if grid and v["subnetworks"] > min(v["num_subnets"]):
            raise CommandError(
                f"--subnetworks must be <= --num-subnets (sigma {min(v['num_subnets'])}: "
                f"{', '.join(grid)} trains that many distinct subnetworks), got {v['subnetworks']}"
            )
    elif cmd == "cv":
        _int_at_least(v, "folds", 2)
    elif cmd == "bench":
        _int_at_least(v, "steps", 1)
        _int_at_least(v, "warmup", 0)
        _int_at_least(v, "layer_features", 1)
        if not v.get("no_layer"):
            from gyrodrop.blockwise import n_dropped_blocks

            n_blocks = -(-v["layer_features"] // v["block_size"])
            if n_dropped_blocks(max(LAYER_DROPS), n_blocks) >= n_blocks:
                raise CommandError(
                    f"--layer-features {v['layer_features']} with --block-size "
                    f"{v['block_size']} gives {n_blocks} block(s), all dropped at "
                    f"{max(LAYER_DROPS):.0%}; use more features, a smaller block or --no-layer"
                )
    check_device(v["device"])
    check_writable("--db", v["db"], directory=False)
    check_writable("--out", v["out"], directory=True)
