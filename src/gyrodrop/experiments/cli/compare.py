"""``gyrodrop compare``: every method x seed; accuracy table and learning curves; with
``--uncertainty --ood-classes``, the uncertainty evaluation of :mod:`gyrodrop.experiments.ood`."""

from __future__ import annotations

import argparse
from typing import Any

from gyrodrop.experiments.cli.options import CommandError, resolve, validate
from gyrodrop.experiments.cli.runner import DataCache, make_configs, train_and_render
from gyrodrop.experiments.ood import split_ood
from gyrodrop.experiments.train import RunConfig


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop compare``; returns the exit status."""
    v = resolve(args, "compare")
    validate("compare", v)
    check_ood_options(v)
    mc = v["mc_samples"] if v.get("uncertainty") else None
    fixed: dict[str, object] = {"mc_samples": mc}
    if v.get("ood_classes") is not None:
        fixed.update(
            ood_classes=tuple(v["ood_classes"]),
            train_limit=v.get("train_limit"),
            ensemble_size=v.get("ensemble_size") or 5,
        )
    configs = make_configs("compare", v, v["methods"], **fixed)
    prepare = _check_ood_split if v.get("ood_classes") is not None else None
    return train_and_render("compare", configs, v, prepare=prepare)


def check_ood_options(v: dict[str, Any]) -> None:
    """:class:`CommandError` for a combination that cannot run (the class indices are
    checked against the data before training)."""
    given = [o for o in ("ensemble_size", "train_limit") if o in v["explicit"]]
    if v.get("ood_classes") is None:
        if given:
            flags = " and ".join("--" + o.replace("_", "-") for o in given)
            raise CommandError(f"{flags} need(s) --ood-classes (the uncertainty evaluation)")
        return
    if not v.get("uncertainty"):
        raise CommandError("--ood-classes needs --uncertainty (it sets up the OOD evaluation)")
    if v.get("ensemble_size") is not None and v["ensemble_size"] < 1:
        raise CommandError(f"--ensemble-size must be an integer >= 1, got {v['ensemble_size']}")
    if v.get("train_limit") is not None and v["train_limit"] < 2:
        raise CommandError(f"--train-limit must be an integer >= 2, got {v['train_limit']}")


def _check_ood_split(configs: list[RunConfig], data: DataCache) -> list[RunConfig]:
    """--ood-classes against the data (class range, an empty OOD set) before training."""
    seen: set[tuple[object, ...]] = set()
    for cfg in configs:
        key = (cfg.dataset, cfg.limit, cfg.ood_classes, cfg.train_limit)
        if key in seen or cfg.ood_classes is None:
            continue
        seen.add(key)
        try:
            split_ood(data(cfg), cfg.ood_classes, cfg.train_limit, cfg.split_seed)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return configs
