"""DropBlock, gyro DropBlock, Dropout2d and no feature-map dropout on a LeNet-style conv net.

    python benchmarks/bench_dropblock.py --threads 1                 # the README table
    python benchmarks/bench_dropblock.py --quick                     # a seconds-long smoke run
    python benchmarks/bench_dropblock.py --limit 60000 --epochs 20 --width 32  # bigger

The net is ``conv5x5(1->C) ReLU [drop] maxpool, conv5x5(C->2C) ReLU [drop] maxpool,
Linear(2C*7*7 -> 256) ReLU, Linear(256 -> 10)``; ``[drop]`` is nothing, ``nn.Dropout2d``,
:class:`gyrodrop.DropBlock2d` or :class:`gyrodrop.GyroDropBlock2d` (on 28x28 and 14x14
maps), put in by :func:`gyrodrop.apply_dropblock` from the ``Dropout2d`` net. Every method
trains from the same initial weights and batch order per seed (Adam, cross-entropy) on a
seeded Fashion-MNIST subset (default 6000 train / 6000 test, 3 epochs, ``C = 16``; the
Debian ``dataset-fashion-mnist`` files, nothing is downloaded) and reports the final
test accuracy (mean +- std over seeds).

"step ms" is the median time of one training step (forward, loss, backward, Adam
update) on one batch, the methods timed in interleaved rounds (``timing.py``); on a
shared machine only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.experiments.data import load_dataset  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402
from training import accuracy, train_step  # noqa: E402

METHODS = ("none", "dropout2d", "dropblock", "gyro-dropblock")


@dataclass(frozen=True)
class Config:
    # data
    limit: int = 6000
    data_dir: str | None = None
    # training
    epochs: int = 3
    batch: int = 64
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 16
    # regularizers
    p: float = 0.1
    block_size: int = 5
    num_subnets: int = 256
    subnets_per_step: int = 16


def lenet(width: int, p: float) -> nn.Sequential:
    """The conv net with ``Dropout2d(p)`` after each conv activation."""
    return nn.Sequential(
        nn.Conv2d(1, width, 5, padding=2),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.MaxPool2d(2),  # (B, C, 14, 14)
        nn.Conv2d(width, 2 * width, 5, padding=2),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.MaxPool2d(2),  # (B, 2C, 7, 7)
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def build(method: str, base: nn.Sequential, cfg: Config, total_steps: int, seed: int) -> nn.Module:
    """A copy of ``base`` (same weights) with ``method`` in its dropout slots."""
    net = copy.deepcopy(base)
    if method == "none":
        for i, m in enumerate(net):
            if isinstance(m, nn.Dropout2d):
                net[i] = nn.Identity()
    elif method == "dropblock":
        gyrodrop.apply_dropblock(net, block_size=cfg.block_size, seed=seed)
    elif method == "gyro-dropblock":
        gyrodrop.apply_dropblock(
            net,
            block_size=cfg.block_size,
            gyro=True,
            num_subnets=cfg.num_subnets,
            subnets_per_step=cfg.subnets_per_step,
            total_steps=total_steps,
            seed=seed,
        )
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subset, one epoch, one seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=Config.limit, help="train and test examples")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--seeds", type=int, default=len(Config.seeds), help="number of seeds")
    parser.add_argument("--width", type=int, default=Config.width, help="channels of conv1")
    parser.add_argument("--p", type=float, default=Config.p)
    parser.add_argument("--block-size", type=int, default=Config.block_size)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = Config(
        limit=512 if args.quick else args.limit,
        epochs=1 if args.quick else args.epochs,
        seeds=(0,) if args.quick else tuple(range(args.seeds)),
        width=8 if args.quick else args.width,
        p=args.p,
        block_size=args.block_size,
        data_dir=args.data_dir,
    )
    data = load_dataset("fashion-mnist", cfg.data_dir, limit=cfg.limit)
    print(data.describe(), flush=True)
    steps_per_epoch = len(data.y_train) // cfg.batch
    total_steps = steps_per_epoch * cfg.epochs

    acc: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        base = lenet(cfg.width, cfg.p)
        g = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(len(data.y_train), generator=g) for _ in range(cfg.epochs)]
        for method in METHODS:
            net = build(method, base, cfg, total_steps, seed)
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
            for order in orders:
                for s in range(steps_per_epoch):
                    idx = order[s * cfg.batch : (s + 1) * cfg.batch]
                    train_step(net, opt, data.x_train[idx], data.y_train[idx])
            acc[method].append(accuracy(net, data.x_test, data.y_test, chunk=1000))
            print(f"seed {seed} {method:15s} test accuracy {acc[method][-1]:.4f}", flush=True)

    # Step time: the methods in interleaved rounds on one fixed batch.
    torch.manual_seed(0)
    base = lenet(cfg.width, cfg.p)
    x, y = data.x_train[: cfg.batch], data.y_train[: cfg.batch]
    steps: dict[str, Callable[[], object]] = {}
    for method in METHODS:
        net = build(method, base, cfg, total_steps, 0)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        steps[method] = lambda net=net, opt=opt: train_step(net, opt, x, y)
    repeats, inner = (3, 2) if args.quick else (9, 10)
    times = interleaved_medians(steps, repeats=repeats, inner=inner, warmup=2)

    def mean_std(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.2f} +- {100 * sd:.2f}"

    rows = [
        [m, mean_std(acc[m]), f"{1000 * times[m]:.1f}", f"{times[m] / times['none']:.2f}"]
        for m in METHODS
    ]
    print(
        f"\nFashion-MNIST, {len(data.y_train)} train / {len(data.y_test)} test, "
        f"{cfg.epochs} epochs, batch {cfg.batch}, {len(cfg.seeds)} seed(s), p={cfg.p}, "
        f"block_size={cfg.block_size}, gyro sigma={cfg.num_subnets} tau={cfg.subnets_per_step}, "
        f"threads={torch.get_num_threads()}\n"
    )
    print(markdown_table(["method", "test accuracy %", "step ms", "vs none"], rows))


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
