"""Stochastic depth on a ResNet-18: regularization that also makes training steps cheaper.

    python examples/stochastic_depth_resnet.py            # 8 epochs on digits, a minute or so
    python examples/stochastic_depth_resnet.py --quick    # 1 epoch, narrow net, for smoke tests

``gyrodrop.apply_stochastic_depth`` wraps every residual block of a model (gyrodrop's
ResNets, torchvision-shaped BasicBlock/Bottleneck, or your own blocks) so that during
training block ``i`` of ``L`` skips its residual branch with probability
``drop_rate * (i + 1) / L`` (``drop_distribution="linear"``). In ``mode="block"`` a
skipped branch is not computed at all, forward or backward, so a step costs less; kept
branches are scaled by ``1 / (1 - p)``, so ``eval()`` is the unchanged network.

The script checks that the surgery leaves eval outputs unchanged, trains the net on
scikit-learn's digits (8x8 images), and times training steps with and without
stochastic depth.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gyrodrop
from gyrodrop.experiments.analysis import time_interleaved
from gyrodrop.experiments.data import load_dataset
from gyrodrop.experiments.models import ResNet18


@dataclass
class Config:
    # model: CIFAR-style ResNet-18, `base` channels in the first stage
    base: int = 16
    # stochastic depth
    drop_rate: float = 0.5
    drop_distribution: str = "linear"
    drop_warmup: float = 0.1  # fraction of training over which rates ramp up from 0
    # optimization
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.02
    timing_steps: int = 20
    seed: int = 0


def make_model(cfg: Config) -> nn.Module:
    with torch.random.fork_rng():  # a seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return ResNet18((1, 8, 8), (64,), 10, 0.0, base=cfg.base)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def step_times_ms(models: list[nn.Module], x: Tensor, y: Tensor, steps: int) -> list[float]:
    """Median wall time of a training step of each model, the models' steps interleaved
    so that they share the machine's conditions (a throw-away optimizer with lr 0)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    fns = [partial(train_step, m.train(), opt, x, y) for m, opt in zip(models, opts, strict=True)]
    return time_interleaved(fns, steps, warmup=3, device=x.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, narrow net")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--drop-rate", type=float, default=Config.drop_rate)
    args = parser.parse_args()
    cfg = Config(epochs=args.epochs, drop_rate=args.drop_rate)
    if args.quick:
        cfg = Config(epochs=1, base=8, timing_steps=3, drop_rate=args.drop_rate)

    data = load_dataset("digits")
    x_train = data.x_train.reshape(-1, 1, 8, 8)  # (N, C, H, W)
    x_test = data.x_test.reshape(-1, 1, 8, 8)
    steps_per_epoch = -(-len(data.y_train) // cfg.batch_size)

    model = make_model(cfg)
    baseline = make_model(cfg)  # the same network without stochastic depth, for timing
    with torch.no_grad():
        before = model.eval()(x_test[:16])
    wrapped = gyrodrop.apply_stochastic_depth(
        model,
        drop_rate=cfg.drop_rate,
        drop_distribution=cfg.drop_distribution,
        mode="block",
        drop_warmup=cfg.drop_warmup,
        total_steps=cfg.epochs * steps_per_epoch,
        seed=cfg.seed,
    )
    with torch.no_grad():
        unchanged = torch.equal(model.eval()(x_test[:16]), before)
    print(f"wrapped {wrapped} residual blocks; eval output unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("stochastic depth changed the eval-mode output")

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        for rows in torch.randperm(len(data.y_train), generator=gen).split(cfg.batch_size):
            train_step(model, opt, x_train[rows], data.y_train[rows])
        with torch.no_grad():
            acc = (model.eval()(x_test).argmax(1) == data.y_test).float().mean().item()
        print(f"epoch {epoch}  test accuracy {acc:.4f}")

    # After training the warm-up is over: the full drop rates apply.
    x, y = x_train[: cfg.batch_size], data.y_train[: cfg.batch_size]
    plain_ms, sd_ms = step_times_ms([baseline, model], x, y, cfg.timing_steps)
    print(
        f"training step, median of {cfg.timing_steps}: without stochastic depth "
        f"{plain_ms:.1f} ms, with it {sd_ms:.1f} ms ({plain_ms / sd_ms:.2f}x)"
    )


if __name__ == "__main__":
    main()
