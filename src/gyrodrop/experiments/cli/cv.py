"""``gyrodrop cv``: stratified k-fold cross-validation, dropout vs gyro."""

from __future__ import annotations

import argparse

from gyrodrop.experiments.cli.options import resolve, validate
from gyrodrop.experiments.cli.runner import make_configs, train_and_render


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop cv``; returns the exit status."""
    v = resolve(args, "cv")
    validate("cv", v)
    configs = []
    for fold in range(v["folds"]):
        configs += make_configs("cv", v, v["methods"], folds=v["folds"], fold=fold)
    return train_and_render("cv", configs, v)
