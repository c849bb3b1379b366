"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
section 4.2): one scalar ``T > 0`` that divides the logits before the softmax, fitted on
held-out data to minimize the negative log-likelihood. It changes confidence, never the
arg-max, so accuracy is unchanged."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["fit_temperature"]

_OWNER = "fit_temperature"


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The temperature ``T`` minimizing the validation NLL of ``softmax(logits / T)``.

    LBFGS (strong-Wolfe line search) on ``log T`` from ``T = 1``, in float64, so ``T``
    stays positive. Use it on a held-out set, then pass it as ``temperature=`` to
    :func:`~gyrodrop.mc_predict` / :func:`~gyrodrop.subnet_ensemble_predict` (or divide
    your own logits by it).

    Args:
        logits: ``(N, C)`` class scores of the model (in eval mode, or the mean logits
            you calibrate), finite.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
        max_iter: LBFGS iterations (>= 1).

    Returns:
        ``T`` as a Python float (``T > 1`` softens over-confident predictions).

    Raises:
        ValueError: ``logits`` not a finite ``(N, C)`` float tensor with ``N >= 1``,
            labels not ``(N,)`` integers in ``[0, C)``.

    Example:
        >>> import torch, gyrodrop
        >>> logits = torch.tensor([[3.0, 0.0]] * 4)  # always 95% sure of class 0
        >>> t = gyrodrop.fit_temperature(logits, torch.tensor([0, 0, 0, 1]))
        >>> round(t, 3)  # softmax(3 / t) = 0.75: the right confidence
        2.731
    """
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1]).to(z.device)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{_OWNER}: max_iter must be an int >= 1, got {max_iter!r}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:  # pragma: no cover - LBFGS on log T stays finite
        raise ValueError(f"{_OWNER}: the fit diverged (T = {t})")
    return t


def _check_logits(logits: Any) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] == 0:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{_OWNER}: logits must be a tensor (N, C) with N >= 1, got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{_OWNER}: logits must be floating point, got {logits.dtype}")
    if not bool(logits.isfinite().all()):
        raise ValueError(f"{_OWNER}: logits must be finite (no NaN or inf)")
    return logits.detach().to(torch.float64)


def _check_labels(labels: Any, n: int, c: int) -> Tensor:
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{_OWNER}: labels must be integer class indices (a tensor, array or list), "
            f"got {type(labels).__name__} {labels!r:.60}"
        ) from None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{_OWNER}: labels must be integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(
            f"{_OWNER}: labels must have shape ({n},) (one per row of logits), got {tuple(y.shape)}"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= c:
        raise ValueError(
            f"{_OWNER}: labels must be in [0, {c}) (the logits' {c} classes), "
            f"got {low if low < 0 else high}"
        )
    return y.long()
