"""Predictive uncertainty: MC dropout and the gyro subnetwork ensemble (digits, an MLP).

    python examples/mc_uncertainty.py            # 40 epochs, seconds on a CPU
    python examples/mc_uncertainty.py --quick    # 3 epochs, for smoke tests

Trains an MLP with gyro dropout, then compares three ways to predict on the test set:

- plain ``model.eval()`` (dropout off: one deterministic pass);
- ``gyrodrop.mc_predict``: ``samples`` passes with only the dropout layers active
  (for ``GyroDropout``, each pass uses one of the subnetworks it trained);
- ``gyrodrop.subnet_ensemble_predict``: one pass per trained subnetwork, averaged;
  deterministic.

and reports accuracy, negative log-likelihood (NLL) and the two uncertainties of a
``gyrodrop.Prediction``: total (predictive entropy) and epistemic (mutual information
between the prediction and the subnetwork, BALD). On inputs unlike the training data
(here: test digits with their pixels shuffled) the epistemic part should be larger.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gyrodrop
from gyrodrop.experiments.data import load_dataset


@dataclass
class Config:
    hidden: int = 256
    p: float = 0.5
    num_subnets: int = 32  # sigma: the ensemble has this many members
    subnets_per_step: int = 4
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    mc_samples: int = 30
    seed: int = 0


def train(cfg: Config) -> tuple[nn.Module, Tensor, Tensor]:
    data = load_dataset("digits")
    steps = cfg.epochs * -(-len(data.y_train) // cfg.batch_size)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(
            nn.Linear(data.in_shape[0], cfg.hidden),
            nn.ReLU(),
            gyrodrop.GyroDropout(cfg.p, cfg.num_subnets, cfg.subnets_per_step, total_steps=steps),
            nn.Linear(cfg.hidden, data.num_classes),
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        for rows in torch.randperm(len(data.y_train), generator=gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(data.x_train[rows]), data.y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model, data.x_test, data.y_test


def report(name: str, probs: Tensor, y: Tensor, pred: gyrodrop.Prediction | None) -> None:
    acc = (probs.argmax(dim=1) == y).float().mean().item()
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    line = f"{name:<22} accuracy {acc:.4f}  NLL {nll:.4f}"
    if pred is not None:
        line += f"  entropy {pred.entropy.mean():.4f}  mutual info {pred.mutual_info.mean():.4f}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, for smoke tests")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--samples", type=int, default=Config.mc_samples)
    args = parser.parse_args()
    cfg = Config(epochs=3 if args.quick else args.epochs, mc_samples=args.samples)

    model, x, y = train(cfg)
    with torch.no_grad():
        plain = model.eval()(x).softmax(dim=1)
    mc = gyrodrop.mc_predict(model, x, samples=cfg.mc_samples, seed=cfg.seed)
    ensemble = gyrodrop.subnet_ensemble_predict(model, x)
    report("eval (dropout off)", plain, y, None)
    report(f"MC dropout ({cfg.mc_samples} passes)", mc.mean, y, mc)
    report(f"subnet ensemble ({cfg.num_subnets})", ensemble.mean, y, ensemble)

    # Out of distribution: the same pixel values in a seeded random order.
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(1))
    shifted = gyrodrop.subnet_ensemble_predict(model, x[:, perm])
    print(
        "epistemic uncertainty (mutual info), subnet ensemble: "
        f"test {ensemble.mutual_info.mean():.4f}, shuffled pixels {shifted.mutual_info.mean():.4f}"
    )
    if not (mc.mutual_info >= 0).all() or not (mc.mutual_info <= mc.entropy + 1e-5).all():
        raise SystemExit("expected 0 <= mutual information <= entropy")


if __name__ == "__main__":
    main()
