"""Classification metrics from predicted class probabilities.

All functions take ``probs`` of shape ``(N, C)`` (rows sum to 1) and integer labels
``(N,)`` and return Python floats, so results go straight into the results database.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accuracy", "nll", "brier", "ece", "reliability_bins", "summary"]

_EPS = 1e-12


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Fraction of rows whose arg-max is the label, in ``[0, 1]``.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    return float((probs.argmax(1) == y).double().mean())


def nll(probs: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of the labels (natural log).

    Example:
        >>> round(nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1])), 4)
        0.6931
    """
    p = probs.double().gather(1, y.view(-1, 1)).clamp_min(_EPS)
    return float(-p.log().mean())


def brier(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score: mean over rows of ``sum_c (p_c - [c == y])^2``, in [0, 2].

    Example:
        >>> brier(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
        2.0
    """
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def reliability_bins(probs: Tensor, y: Tensor, bins: int = 15) -> list[tuple[float, float, int]]:
    """Per confidence bin (equal width on ``[0, 1]``): mean confidence, accuracy, count.

    Empty bins give ``(0.0, 0.0, 0)``.
    """
    if bins < 1:
        raise ValueError(f"reliability_bins: bins must be >= 1, got {bins}")
    conf, pred = probs.double().max(1)
    correct = (pred == y).double()
    index = (conf * bins).long().clamp(0, bins - 1)
    out: list[tuple[float, float, int]] = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        if n == 0:
            out.append((0.0, 0.0, 0))
        else:
            out.append((float(conf[sel].mean()), float(correct[sel].mean()), n))
    return out


def ece(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins:
    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.

    Example:
        >>> round(ece(torch.tensor([[0.8, 0.2], [0.8, 0.2]]), torch.tensor([0, 1])), 3)
        0.3
    """
    table = reliability_bins(probs, y, bins)
    total = sum(n for _, _, n in table)
    return float(sum(n * abs(a - c) for c, a, n in table) / max(total, 1))


def summary(probs: Tensor, y: Tensor, prefix: str = "") -> dict[str, float]:
    """``{prefix}acc, {prefix}nll, {prefix}ece, {prefix}brier`` in one dict."""
    return {
        f"{prefix}acc": accuracy(probs, y),
        f"{prefix}nll": nll(probs, y),
        f"{prefix}ece": ece(probs, y),
        f"{prefix}brier": brier(probs, y),
    }
