"""Block-wise gyro dropout: an MLP whose dropped neurons are never computed.

    python examples/blockwise_mlp.py            # 30 epochs on digits, seconds on a CPU
    python examples/blockwise_mlp.py --quick    # 2 epochs, narrow layers, for smoke tests

``gyrodrop.apply_block_gyro`` fuses every ``nn.Dropout -> nn.Linear`` pair of a model
into one ``gyrodrop.BlockGyroLinear``: blocks of ``block_size`` adjacent input features
are dropped together, every mask drops the same number of blocks, and the Linear's
forward, input-gradient and weight-gradient GEMMs skip the dropped blocks, so a training
step costs about ``1 - p`` of the dense one. ``eval()`` is a plain Linear with the same
weights. A layer can also be built directly::

    layer = gyrodrop.BlockGyroLinear(1024, 1024, p=0.5, block_size=32, total_steps=steps)
    layer = gyrodrop.BlockGyroLinear.from_linear(linear, p=0.5, total_steps=steps)

The script trains the MLP on scikit-learn's digits and times its training step against
the same MLP with ``nn.Dropout`` (interleaved, medians; ``make bench`` has the careful
benchmark).
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


@dataclass
class Config:
    # model: in -> hidden -> hidden -> classes, Dropout before each hidden Linear
    hidden: int = 1024
    p: float = 0.5
    # block-wise gyro dropout (the paper's settings: 32-wide blocks, 2 row groups)
    block_size: int = 32
    num_subnets: int = 64
    subnets_per_step: int = 2
    # optimization (the paper's: RMSprop, batch 256)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-4
    timing_steps: int = 20
    seed: int = 0


def make_mlp(cfg: Config, in_features: int, num_classes: int) -> nn.Sequential:
    with torch.random.fork_rng():  # a seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return nn.Sequential(
            nn.Linear(in_features, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.p),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.p),
            nn.Linear(cfg.hidden, num_classes),
        )


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
    parser.add_argument("--quick", action="store_true", help="2 epochs, narrow layers")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--p", type=float, default=Config.p)
    args = parser.parse_args()
    cfg = Config(epochs=args.epochs, p=args.p)
    if args.quick:
        cfg = Config(epochs=2, hidden=256, timing_steps=3, p=args.p)

    data = load_dataset("digits")
    n_features, n_classes = data.in_shape[0], data.num_classes
    steps = cfg.epochs * -(-len(data.y_train) // cfg.batch_size)

    model = make_mlp(cfg, n_features, n_classes)
    fused = gyrodrop.apply_block_gyro(
        model,
        num_subnets=cfg.num_subnets,
        subnets_per_step=cfg.subnets_per_step,
        block_size=cfg.block_size,
        total_steps=steps,
        seed=cfg.seed,
    )
    print(f"fused {fused} Dropout -> Linear pairs:\n{model}")

    opt = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        for rows in torch.randperm(len(data.y_train), generator=gen).split(cfg.batch_size):
            train_step(model, opt, data.x_train[rows], data.y_train[rows])
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            with torch.no_grad():
                pred = model.eval()(data.x_test).argmax(dim=1)
            acc = (pred == data.y_test).float().mean().item()
            print(f"epoch {epoch:3d}  test accuracy {acc:.4f}")

    # The same MLP with nn.Dropout, for timing (a full batch of the paper's size).
    dense = make_mlp(cfg, n_features, n_classes)
    gen_x = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch_size, n_features, generator=gen_x)
    y = torch.randint(0, n_classes, (cfg.batch_size,), generator=gen_x)
    dense_ms, block_ms = step_times_ms([dense, model], x, y, cfg.timing_steps)
    print(
        f"training step, median of {cfg.timing_steps}: nn.Dropout {dense_ms:.2f} ms, "
        f"block-wise gyro dropout {block_ms:.2f} ms ({dense_ms / block_ms:.2f}x)"
    )


if __name__ == "__main__":
    main()
