"""``gyrodrop sweep``: the sigma x tau grid (Table 1), baselines once."""

from __future__ import annotations

import argparse
import sys

from gyrodrop.experiments.cli.options import resolve, validate
from gyrodrop.experiments.cli.runner import make_configs, train_and_render


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop sweep``; returns the exit status."""
    v = resolve(args, "sweep")
    validate("sweep", v)
    skipped = [(s, t) for s in v["num_subnets"] for t in v["subnets_per_step"] if t > s]
    if skipped and not v.get("quiet"):
        cells = ", ".join(f"sigma {s} tau {t}" for s, t in skipped)
        print(
            f"note: left out {len(skipped)} grid cell(s) with tau > sigma: {cells}", file=sys.stderr
        )
    configs = make_configs("sweep", v, v["baselines"]) + make_configs("sweep", v, v["methods"])
    return train_and_render("sweep", configs, v)
