"""``gyrodrop diversity``: feature distance among subnetworks (Figure 5)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gyrodrop.experiments.cli.options import CommandError, check, resolve
from gyrodrop.experiments.cli.runner import make_configs, train_and_render
from gyrodrop.experiments.train import RunConfig


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop diversity``; returns the exit status."""
    from gyrodrop.experiments.analysis import diversity

    v = resolve(args, "diversity")
    check(v)
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
    configs = make_configs("diversity", v, v["methods"])

    def extra(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
        return lambda model, data: diversity(
            model, data, count=v["subnetworks"], eval_size=v["eval_size"], seed=cfg.seed
        )

    return train_and_render("diversity", configs, v, extra)
