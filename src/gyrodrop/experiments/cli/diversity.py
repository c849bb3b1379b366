"""``gyrodrop diversity``: feature distance among subnetworks (Figure 5)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from gyrodrop.experiments.cli.options import CommandError, resolve, validate
from gyrodrop.experiments.cli.runner import DataCache, make_configs, train_and_render
from gyrodrop.experiments.train import RunConfig


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop diversity``; returns the exit status.

    ``--subnetworks`` and the test examples used (``--eval-size``, at most the test
    split) are part of every run's key. An explicit ``--eval-size`` larger than the test
    split, or more subnetworks than training visited, is an error before training.
    """
    from gyrodrop.experiments.analysis import diversity, subnetwork_steps

    v = resolve(args, "diversity")
    validate("diversity", v)
    count = v["subnetworks"]
    configs = make_configs("diversity", v, v["methods"], subnetworks=count)

    def prepare(configs: list[RunConfig], data: DataCache) -> list[RunConfig]:
        n_test = len(data(configs[0]).y_test)
        if "eval_size" in v["explicit"] and v["eval_size"] > n_test:
            raise CommandError(
                f"--eval-size must be <= the {n_test} test examples of {v['dataset']}"
                f"{' (after --limit)' if v.get('limit') else ''}, got {v['eval_size']}"
            )
        size = min(v["eval_size"], n_test)
        return [dataclasses.replace(c, eval_size=size) for c in configs]

    def inspect(cfg: RunConfig, model: nn.Module) -> None:
        try:
            subnetwork_steps(model, count)
        except ValueError as e:  # training visits fewer distinct subnetworks
            raise CommandError(f"--subnetworks {count} is too many for {cfg.method}: {e}") from e

    def extra(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
        assert cfg.eval_size is not None
        size = cfg.eval_size
        return lambda model, data: diversity(
            model, data, count=count, eval_size=size, seed=cfg.seed
        )

    return train_and_render("diversity", configs, v, extra, prepare=prepare, inspect=inspect)
