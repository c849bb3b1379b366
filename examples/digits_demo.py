"""Train a small MLP on scikit-learn's digits with nn.Dropout and with GyroDropout.

    python examples/digits_demo.py

Prints the test accuracy of both; runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import gyrodrop


def train(use_gyro: bool, epochs: int = 40, batch: int = 64, seed: int = 0) -> float:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr = torch.tensor((xtr - mean) / std, dtype=torch.float32)
    xte = torch.tensor((xte - mean) / std, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 10),
    )
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    if use_gyro:
        gyrodrop.apply_gyro_dropout(model, num_subnets=64, subnets_per_step=4, total_steps=steps)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


if __name__ == "__main__":
    print(f"nn.Dropout  test accuracy: {train(False):.4f}")
    print(f"GyroDropout test accuracy: {train(True):.4f}")
