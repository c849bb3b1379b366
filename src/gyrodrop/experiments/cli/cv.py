"""``gyrodrop cv``: stratified k-fold cross-validation, dropout vs gyro."""

from __future__ import annotations

import argparse

from gyrodrop.experiments.cli.options import CommandError, check, resolve
from gyrodrop.experiments.cli.runner import make_configs, train_and_render


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop cv``; returns the exit status."""
    v = resolve(args, "cv")
    check(v)
    if v["folds"] < 2:
        raise CommandError(f"--folds must be >= 2, got {v['folds']}")
    if v["input_p"] and not v["model"].startswith("mlp"):
        raise CommandError("cv: --input-p needs an mlp model (or pass --input-p 0)")
    if v["input_p"] and not 0.0 <= v["input_p"] < 1.0:
        raise CommandError(f"--input-p must be in [0, 1), got {v['input_p']}")
    configs = []
    for fold in range(v["folds"]):
        configs += make_configs("cv", v, v["methods"], folds=v["folds"], fold=fold)
    return train_and_render("cv", configs, v)
