"""``gyrodrop sweep``: the sigma x tau grid (Table 1), baselines once."""

from __future__ import annotations

import argparse

from gyrodrop.experiments.cli.options import check, resolve
from gyrodrop.experiments.cli.runner import make_configs, train_and_render


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop sweep``; returns the exit status."""
    v = resolve(args, "sweep")
    check(v)
    configs = make_configs("sweep", v, v["baselines"]) + make_configs("sweep", v, v["methods"])
    return train_and_render("sweep", configs, v)
