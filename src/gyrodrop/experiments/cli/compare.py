"""``gyrodrop compare``: every method x seed; accuracy table and learning curves."""

from __future__ import annotations

import argparse

from gyrodrop.experiments.cli.options import resolve, validate
from gyrodrop.experiments.cli.runner import make_configs, train_and_render


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop compare``; returns the exit status."""
    v = resolve(args, "compare")
    validate("compare", v)
    mc = v["mc_samples"] if v.get("uncertainty") else None
    configs = make_configs("compare", v, v["methods"], mc_samples=mc)
    return train_and_render("compare", configs, v)
