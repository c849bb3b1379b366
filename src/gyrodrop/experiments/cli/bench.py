"""``gyrodrop bench``: training throughput per method (Figure 7, Table 7)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gyrodrop.experiments.cli.options import LAYER_DROPS, check_device, resolve, validate
from gyrodrop.experiments.cli.runner import Progress, emit, make_configs, open_store
from gyrodrop.experiments.data import load_dataset

#: Input shape and class count of the built-in datasets (bench times random data of it).
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((64,), 10),
    "breast_cancer": ((30,), 2),
    "wine": ((13,), 3),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "svhn": ((3, 32, 32), 10),
}


def run(args: argparse.Namespace) -> int:
    """Runs ``gyrodrop bench``; returns the exit status."""
    from gyrodrop.experiments import report
    from gyrodrop.experiments.analysis import time_block_layer, time_train_steps

    v = resolve(args, "bench")
    methods = v["methods"] or ["none", "dropout", "gyro", "blockwise"]
    v["methods"] = methods
    validate("bench", v)
    device = check_device(v["device"])
    progress = Progress(v.get("quiet", False))
    if v["dataset"] in SHAPES:
        in_shape, num_classes = SHAPES[v["dataset"]]
    else:
        ds = load_dataset(v["dataset"], v.get("data_dir"), limit=16)
        in_shape, num_classes = ds.in_shape, ds.num_classes
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open_store(v["db"]) as store:
        configs = make_configs("bench", {**v, "seeds": 1}, methods)
        progress.note(
            f"timing {v['model']}: {', '.join(c.method for c in configs)} "
            f"({v['steps']} interleaved steps each)"
        )
        timings = time_train_steps(
            configs,
            tuple(in_shape),
            num_classes,
            steps=v["steps"],
            warmup=v["warmup"],
            device=device,
        )
        for cfg, m in zip(configs, timings, strict=False):
            conf = dict(
                dataset=cfg.dataset,
                model=cfg.model,
                method=cfg.method,
                batch_size=cfg.batch_size,
                num_subnets=cfg.num_subnets,
                subnets_per_step=cfg.subnets_per_step,
                block_size=cfg.block_size,
                widths=list(cfg.widths) if cfg.widths else None,
                **env,
            )
            store.save_bench("train_step", conf, m)
        if not v.get("no_layer"):
            for drop in LAYER_DROPS:
                progress.note(f"timing block-wise layer, drop {drop:.0%}")
                m = time_block_layer(
                    drop,
                    features=v["layer_features"],
                    batch_size=v["batch_size"],
                    block_size=v["block_size"],
                    steps=v["steps"],
                    warmup=v["warmup"],
                    device=device,
                )
                conf = dict(
                    drop=drop,
                    features=v["layer_features"],
                    batch_size=v["batch_size"],
                    block_size=v["block_size"],
                    **env,
                )
                store.save_bench("block_layer", conf, m)
        text = report.bench_tables(store.bench_records())
    emit("## Throughput (Figure 7, Table 7)\n\n" + text)
    if not v.get("no_plots"):
        out = Path(v["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text("# Throughput (Figure 7, Table 7)\n\n" + text + "\n")
        progress.note(f"wrote {out / 'bench.md'}")
    return 0
