"""The options of ``gyrodrop compare --uncertainty --ood-classes LIST`` (out-of-distribution
evaluation, deep ensembles; :mod:`gyrodrop.experiments.ood`); checked in
:mod:`.compare`."""

from __future__ import annotations

import argparse

__all__ = ["add_ood_options"]


def _class_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class indices, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct class indices >= 0, got {text!r}")
    return values


def add_ood_options(compare: argparse.ArgumentParser) -> None:
    """``--ood-classes``, ``--ensemble-size`` and ``--train-limit`` on ``compare``."""
    group = compare.add_argument_group("uncertainty (with --uncertainty)")
    group.add_argument(
        "--ood-classes",
        type=_class_list,
        metavar="LIST",
        help="hold these classes out of training and use their test examples as the "
        "out-of-distribution set, e.g. 5,6,7,8,9; the report gives, per method, the "
        "single network, MC dropout, the gyro subnetwork ensemble and a deep ensemble: "
        "accuracy, NLL, Brier, ECE, AURC, OOD AUROC / AUPR / FPR95, paired by seed",
    )
    group.add_argument(
        "--ensemble-size",
        type=int,
        metavar="N",
        help="with --ood-classes: networks in the deep ensemble, each trained on its own "
        "seed (default 5; 1 = no deep ensemble)",
    )
    group.add_argument(
        "--train-limit",
        type=int,
        metavar="N",
        help="with --ood-classes: at most N training examples of the kept classes (the "
        "test sets stay whole; --limit caps both)",
    )
