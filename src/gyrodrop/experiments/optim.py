"""TensorFlow 1 style RMSProp and the paper's step learning-rate schedule.

The authors train with ``tf.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9,
epsilon=1.0)``. Its update differs from :class:`torch.optim.RMSprop` in two ways:
epsilon is added *inside* the square root, and the mean-square accumulator starts at
one, not zero. Per parameter ``w`` with gradient ``g``::

    ms  <- decay * ms + (1 - decay) * g**2           (ms starts at initial_ms = 1)
    mom <- momentum * mom + lr * g / sqrt(ms + eps)  (mom starts at 0)
    w   <- w - mom

With ``eps = 1`` the denominator is at least one, so early steps are close to SGD with
momentum and learning rate ``lr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TF1RMSprop", "step_milestones", "step_lr_factor"]


class TF1RMSprop(torch.optim.Optimizer):
    """RMSProp with TensorFlow 1 semantics (epsilon inside the square root).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0); default 0.007, the paper's.
        decay: discount of the mean-square accumulator, in ``[0, 1)``; default 0.9.
        momentum: momentum, in ``[0, 1)``; default 0.9.
        eps: added to the mean square inside the square root (>= 0); default 1.0.
        initial_ms: starting value of the mean-square accumulator (TensorFlow 1: 1.0).

    Raises:
        ValueError: an argument out of range (the message names it).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = TF1RMSprop([w], lr=0.1)
        >>> w.grad = torch.tensor([2.0])
        >>> opt.step()
        >>> round(w.item(), 5)  # ms = 0.9 + 0.1 * 4 = 1.3; step 0.1 * 2 / sqrt(2.3)
        0.86812
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.007,
        decay: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1.0,
        initial_ms: float = 1.0,
    ) -> None:
        owner = "TF1RMSprop"
        if not lr > 0:
            raise ValueError(f"{owner}: lr must be > 0, got {lr}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"{owner}: decay must be in [0, 1), got {decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum}")
        if not eps >= 0:
            raise ValueError(f"{owner}: eps must be >= 0, got {eps}")
        if not initial_ms >= 0:
            raise ValueError(f"{owner}: initial_ms must be >= 0, got {initial_ms}")
        if eps == 0 and initial_ms == 0:
            raise ValueError(f"{owner}: eps and initial_ms cannot both be 0 (division by zero)")
        defaults = {
            "lr": lr,
            "decay": decay,
            "momentum": momentum,
            "eps": eps,
            "initial_ms": initial_ms,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["decay"], group["momentum"]
            eps, initial_ms = group["eps"], group["initial_ms"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("TF1RMSprop: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["ms"] = torch.full_like(p, float(initial_ms))
                    state["mom"] = torch.zeros_like(p)
                ms, mom = state["ms"], state["mom"]
                ms.mul_(decay).addcmul_(g, g, value=1.0 - decay)
                mom.mul_(momentum).addcdiv_(g, (ms + eps).sqrt_(), value=lr)
                p.sub_(mom)
        return loss


def step_milestones(epochs: int, fractions: Sequence[float] = (0.4, 0.8)) -> list[int]:
    """Epoch indices (0-based) at whose start the learning rate drops x0.1.

    The paper drops it at epochs 40 and 80 of 100; shorter runs drop at the same
    fractions, rounded: ``round(f * epochs)`` (milestones at 0 or >= ``epochs`` never
    fire).

    Example:
        >>> step_milestones(100), step_milestones(30), step_milestones(10)
        ([40, 80], [12, 24], [4, 8])
    """
    if epochs < 1:
        raise ValueError(f"step_milestones: epochs must be >= 1, got {epochs}")
    return [int(round(f * epochs)) for f in fractions]


def step_lr_factor(epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """The learning-rate multiplier during 0-based ``epoch``: ``gamma ** k`` where ``k``
    is the number of milestones in ``(0, epoch]``.

    Example:
        >>> [step_lr_factor(e, [4, 8]) for e in (0, 3, 4, 8, 9)]
        [1.0, 1.0, 0.1, 0.010000000000000002, 0.010000000000000002]
    """
    k = sum(1 for m in milestones if 0 < m <= epoch)
    return float(gamma**k)
