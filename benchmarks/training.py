"""The training step and the test accuracy shared by the accuracy-and-speed benchmarks
(``bench_dropblock.py``, ``bench_sd_transformer.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One optimizer step on cross-entropy."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def accuracy(net: nn.Module, x: Tensor, y: Tensor, chunk: int) -> float:
    """Test accuracy in eval mode, ``chunk`` examples per forward; leaves ``net`` in
    training mode."""
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
            for i in range(0, len(y), chunk)
        )
    net.train()
    return correct / len(y)
