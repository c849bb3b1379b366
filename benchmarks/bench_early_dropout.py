"""Early dropout (Liu et al., ICML 2023) next to dropout and gyro dropout in an
underfitting budget: few optimizer steps, where every dropout variant trails no dropout.

    nice -n 10 python benchmarks/bench_early_dropout.py --threads 1   # the README table
    python benchmarks/bench_early_dropout.py --quick                  # a seconds-long smoke run

The authors' MLP (``paper-mlp``: Linear layers, bias-free, Xavier init, dropout before
every Linear but the first) at width 512 on a seeded 4000/4000 Fashion-MNIST subset, 15
epochs of batch 256 (225 optimizer steps), the authors' optimizer (TF1-style RMSProp, lr
0.007, momentum 0.9, lr x0.1 at 40% and 80% of the epochs), ``p = 0.5``. Variants, each
from the same weights and batch order per seed:

- ``none``: no dropout;
- ``dropout``: ``nn.Dropout(0.5)`` all run long;
- ``gyro``: :class:`gyrodrop.GyroDropout` (sigma 256, tau 16) all run long;
- ``early dropout``: dropout (``GyroDropout`` with ``schedule="random"``, sigma 2**62
  and tau = the batch: a fresh random mask per row per step) with
  ``drop_mode="early", drop_cutoff=0.2``: dropout for the first 20% of the steps, then
  the identity;
- ``early gyro``: gyro dropout (sigma 256, tau 16) with ``drop_mode="early",
  drop_cutoff=0.2``.

Reports the final test and training accuracy (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.experiments.data import load_dataset  # noqa: E402
from gyrodrop.experiments.models import build_model  # noqa: E402
from gyrodrop.experiments.optim import TF1RMSprop, step_lr_factor, step_milestones  # noqa: E402
from timing import markdown_table  # noqa: E402
from training import accuracy  # noqa: E402

P = 0.5
CUTOFF = 0.2
GYRO = {"num_subnets": 256, "subnets_per_step": 16}
#: Dropout as a gyro layer: one fresh random mask per row per step (tau = the batch).
DROPOUT_AS_GYRO = {"num_subnets": 2**62, "subnets_per_step": 256, "schedule": "random"}

#: name -> keyword arguments of apply_gyro_dropout, or None (the model as built).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "dropout": None,
    "gyro": GYRO,
    "early dropout": {**DROPOUT_AS_GYRO, "drop_mode": "early", "drop_cutoff": CUTOFF},
    "early gyro": {**GYRO, "drop_mode": "early", "drop_cutoff": CUTOFF},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subset, two epochs, one seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=4000, help="train and test examples")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limit, epochs = (512, 2) if args.quick else (args.limit, args.epochs)
    seeds = [0] if args.quick else list(range(args.seeds))
    data = load_dataset("fashion-mnist", args.data_dir, limit=limit)
    print(data.describe(), flush=True)
    steps_per_epoch = len(data.y_train) // args.batch
    total = steps_per_epoch * epochs
    milestones = step_milestones(epochs)
    widths = (args.width,) * 3

    test: dict[str, list[float]] = {v: [] for v in VARIANTS}
    train: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        torch.manual_seed(seed)
        base = build_model("paper-mlp", data.in_shape, data.num_classes, P, widths=widths)
        g = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(len(data.y_train), generator=g) for _ in range(epochs)]
        for name, options in VARIANTS.items():
            net: nn.Module = copy.deepcopy(base)
            if name == "none":
                for module in net.modules():
                    if isinstance(module, nn.Dropout):
                        module.p = 0.0
            elif options is not None:
                gyrodrop.apply_gyro_dropout(net, total_steps=total, seed=seed, **options)
            opt = TF1RMSprop(net.parameters(), lr=0.007, momentum=0.9)
            net.train()
            for epoch, order in enumerate(orders):
                for group in opt.param_groups:
                    group["lr"] = 0.007 * step_lr_factor(epoch, milestones)
                for s in range(steps_per_epoch):
                    idx = order[s * args.batch : (s + 1) * args.batch]
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
                    opt.step()
            test[name].append(accuracy(net, data.x_test, data.y_test, chunk=1000))
            train[name].append(accuracy(net, data.x_train, data.y_train, chunk=1000))
            print(
                f"seed {seed} {name:14s} test {test[name][-1]:.4f} train {train[name][-1]:.4f}",
                flush=True,
            )

    def mean_std(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.2f} +- {100 * sd:.2f}"

    print(
        f"\nFashion-MNIST {len(data.y_train)} train / {len(data.y_test)} test, paper-mlp "
        f"width {args.width}, {epochs} epochs x {steps_per_epoch} steps, p={P}, "
        f"cutoff {CUTOFF}, {len(seeds)} seed(s), threads={torch.get_num_threads()}\n"
    )
    rows = [[name, mean_std(test[name]), mean_std(train[name])] for name in VARIANTS]
    print(markdown_table(["variant", "test accuracy %", "train accuracy %"], rows))


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
