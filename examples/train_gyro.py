"""Gyro dropout in a plain PyTorch training loop (scikit-learn's digits, an MLP).

    python examples/train_gyro.py            # 60 epochs, seconds on a CPU
    python examples/train_gyro.py --quick    # 3 epochs, for smoke tests
    python examples/train_gyro.py --accumulate 2

The three things to do in your own loop:

1. build the model with ordinary ``nn.Dropout`` layers, then swap them for
   ``GyroDropout`` with ``gyrodrop.apply_gyro_dropout``, telling it how many optimizer
   steps the run has (``total_steps``), so each of the ``num_subnets`` subnetworks gets
   its share of training;
2. nothing to do for the step: the model advances every gyro layer once per training
   forward; with gradient accumulation (several forwards per optimizer step) call
   ``gyrodrop.bind_to_optimizer(model, optimizer)`` once, so it steps with the optimizer;
3. ``model.eval()`` for evaluation: every ``GyroDropout`` is then the identity.

The schedule position lives in the model's buffers, so ``model.state_dict()`` is all a
checkpoint needs; the script checks that a model restored mid-run continues with the
same masks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

import gyrodrop
from gyrodrop.experiments.data import load_dataset


@dataclass
class Config:
    # data
    dataset: str = "digits"
    batch_size: int = 64
    # model
    hidden: int = 256
    p: float = 0.5
    # gyro dropout: sigma subnetworks, tau trained at once (one per row group)
    num_subnets: int = 64
    subnets_per_step: int = 4
    # optimization
    epochs: int = 60
    lr: float = 1e-3
    accumulate: int = 1  # forwards per optimizer step
    seed: int = 0


def make_model(cfg: Config, in_features: int, num_classes: int, total_steps: int) -> nn.Module:
    """An MLP with ordinary dropout, then every ``nn.Dropout`` swapped for GyroDropout."""
    model = nn.Sequential(
        nn.Linear(in_features, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.p),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.p),
        nn.Linear(cfg.hidden, num_classes),
    )
    gyrodrop.apply_gyro_dropout(
        model,
        num_subnets=cfg.num_subnets,
        subnets_per_step=cfg.subnets_per_step,
        total_steps=total_steps,  # optimizer steps of the whole run
        seed=cfg.seed,
    )
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(cfg: Config) -> float:
    data = load_dataset(cfg.dataset)
    n_features, n_classes = data.in_shape[0], data.num_classes
    micro_batches = -(-len(data.y_train) // cfg.batch_size)
    total_steps = cfg.epochs * -(-micro_batches // cfg.accumulate)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():  # a seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, n_features, n_classes, total_steps)
    print(model)

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.accumulate > 1:
        gyrodrop.bind_to_optimizer(model, optimizer)  # one gyro step per optimizer step
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(data.y_train), generator=gen)
        for i, rows in enumerate(order.split(cfg.batch_size)):
            loss = loss_fn(model(data.x_train[rows]), data.y_train[rows]) / cfg.accumulate
            loss.backward()
            if (i + 1) % cfg.accumulate == 0 or i == micro_batches - 1:
                optimizer.step()
                optimizer.zero_grad()
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            acc = accuracy(model, data.x_test, data.y_test)
            print(f"epoch {epoch:3d}  test accuracy {acc:.4f}")

    # Resume: a fresh model loaded from the state_dict continues the same mask sequence.
    restored = make_model(cfg, n_features, n_classes, total_steps)
    restored.load_state_dict(model.state_dict())  # weights + step/seed of every layer
    x = data.x_train[: cfg.batch_size]
    same = torch.equal(model.train()(x), restored.train()(x))
    print(f"a model restored from the state_dict applies the same gyro masks: {same}")
    if not same:
        raise SystemExit("resume check failed")
    return accuracy(model, data.x_test, data.y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, for smoke tests")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--accumulate", type=int, default=Config.accumulate)
    parser.add_argument("--seed", type=int, default=Config.seed)
    args = parser.parse_args()
    cfg = Config(
        epochs=3 if args.quick else args.epochs, accumulate=args.accumulate, seed=args.seed
    )
    print(f"final test accuracy: {train(cfg):.4f}")


if __name__ == "__main__":
    main()
