"""Running the Monte-Carlo passes in chunks of samples and summarizing them: batches
(tensors or keyword mappings), the rows per forward, and the running sums of the class
probabilities."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from gyrodrop._validation import check_choice, check_int
from gyrodrop.stochastic_depth import (
    MCLayoutError,
)

__all__ = ["Batch", "Prediction", "run_passes", "ROW_BUDGET", "PAIRINGS", "OUTPUTS"]

ROW_BUDGET = 2048  # rows per forward when batch_samples is not given

#: How subnetwork ``k`` pairs the layers' masks (see :func:`subnet_ensemble_predict`).
Pairing = Literal["auto", "trained", "index"]
PAIRINGS: tuple[Pairing, ...] = ("auto", "trained", "index")
#: What the model returns: logits (softmaxed here) or probabilities.
Output = Literal["logits", "probs"]
OUTPUTS: tuple[Output, ...] = ("logits", "probs")


class _Summary(NamedTuple):
    mean: Tensor
    variance: Tensor
    entropy: Tensor
    mutual_info: Tensor


class Prediction(_Summary):
    """Summary of ``S`` stochastic passes over ``N`` examples with ``C`` classes.

    A named tuple of four tensors (``mean, variance, entropy, mutual_info = pred``):

    Attributes:
        mean: predictive class probabilities, ``(N, C)``, rows sum to 1.
        variance: per example, the variance over passes of each class probability,
            averaged over classes, ``(N,)`` (population variance, divided by ``S``).
        entropy: total predictive entropy ``H[mean]`` in nats, ``(N,)``.
        mutual_info: BALD, ``H[mean] - mean_s H[p_s]`` in nats, ``(N,)``; epistemic
            uncertainty, in ``[0, entropy]`` (0 when all passes agree).
        pairing: how the gyro layers were combined into subnetworks, ``"trained"`` or
            ``"index"`` (``None`` without gyro layers); not a tuple field.
        pairing_reason: why that pairing (``""`` when it was asked for explicitly).

    All tensors float32, on the input's device.

    Example:
        >>> import torch, gyrodrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
        >>> pred = gyrodrop.mc_predict(net, torch.randn(5, 4), samples=8)
        >>> pred.mean.shape, pred.entropy.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> bool((pred.mutual_info <= pred.entropy + 1e-6).all())
        True
    """

    pairing: str | None
    pairing_reason: str

    def __new__(
        cls,
        mean: Tensor,
        variance: Tensor,
        entropy: Tensor,
        mutual_info: Tensor,
        pairing: str | None = None,
        pairing_reason: str = "",
    ) -> Prediction:
        self = super().__new__(cls, mean, variance, entropy, mutual_info)
        self.pairing = pairing
        self.pairing_reason = pairing_reason
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle keep the pairing
        return (*self, self.pairing, self.pairing_reason)


# --------------------------------------------------------------------------------------
# Running the passes and summarizing them.


#: A batch: a tensor ``(N, *)`` (``model(x)``) or a mapping of keyword arguments
#: (``model(**x)``, e.g. ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
Batch = Tensor | Mapping[str, Any]


def batch_rows(owner: str, x: Any) -> int:
    """``N``, the rows of a batch; ``ValueError`` naming what is wrong."""
    if isinstance(x, Mapping):
        sizes = {k: v.shape[0] for k, v in x.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(
                f"{owner}: a dict batch must hold tensors (N, *) sharing N >= 1 (the rows), "
                f"got first-dim sizes {sizes}"
            )
        return next(iter(sizes.values()))
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{owner}: x must be a tensor of shape (N, *) with N >= 1 or a dict of keyword "
            f"tensors sharing N, got {shape}"
        )
    return int(x.shape[0])


def batch_device(x: Batch) -> torch.device:
    if isinstance(x, Tensor):
        return x.device
    return next(v.device for v in x.values() if isinstance(v, Tensor))


def _repeat(x: Batch, n: int) -> Batch:
    """The batch repeated ``n`` times along dim 0 (``(n * N, *)``); other values as is."""
    if isinstance(x, Tensor):
        return x.repeat(n, *([1] * (x.dim() - 1)))
    return {
        k: v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() > 0 else v
        for k, v in x.items()
    }


def _scores(owner: str, out: Any, output_fn: Callable[[Any], Tensor] | None) -> Any:
    """The class scores in a model's output: ``output_fn(out)``, the tensor itself, or
    the ``logits`` attribute of a ``ModelOutput``-like object."""
    if output_fn is not None:
        return output_fn(out)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"{owner}: the model returned a {type(out).__name__} without a tensor .logits; "
        "hint: pass output_fn= (a function from the model's output to class scores)"
    )


def check_inputs(owner: str, model: Any, x: Any, output: str, pairing: str) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    batch_rows(owner, x)
    check_choice(owner, "output", output, OUTPUTS)
    check_choice(owner, "pairing", pairing, PAIRINGS)


def chunk_size(owner: str, batch: Any, total: int, rows: int, name: str = "batch_samples") -> int:
    """Passes per forward: ``batch`` (the user's argument ``name``, an int >= 1) or as
    many as fit in :data:`ROW_BUDGET` rows, at most ``total``."""
    if batch is None:
        return max(1, min(total, ROW_BUDGET // rows))
    check_int(owner, name, batch, 1)
    return min(int(batch), total)


class _Accumulator:
    """Running sums over passes, in float64: of ``p``, of ``p**2`` and of ``H[p]``."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: tuple[Tensor, Tensor, Tensor] | None = None

    def add(self, probs: Tensor) -> None:  # (passes, N, C)
        h = -torch.special.xlogy(probs, probs).sum(-1)  # (passes, N)
        sums = (probs.sum(0), (probs * probs).sum(0), h.sum(0))
        if self.sums is None:
            self.sums = sums
        else:
            self.sums = (self.sums[0] + sums[0], self.sums[1] + sums[1], self.sums[2] + sums[2])
        self.n += probs.shape[0]

    def result(self) -> Prediction:
        if self.sums is None:
            raise RuntimeError("_Accumulator: no passes were added")
        sum_p, sum_p2, sum_h = self.sums
        mean = sum_p / self.n
        variance = (sum_p2 / self.n - mean * mean).clamp_min(0).mean(-1)
        entropy = (-torch.special.xlogy(mean, mean).sum(-1)).clamp_min(0)
        mutual = torch.minimum((entropy - sum_h / self.n).clamp_min(0), entropy)
        f = torch.float32
        return Prediction(mean.to(f), variance.to(f), entropy.to(f), mutual.to(f))


def _probs(owner: str, out: Any, passes: int, rows: int, output: str) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != passes * rows:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{owner}: the model must return a tensor of shape (rows, classes); got {shape} "
            f"for {passes * rows} rows; hint: wrap the model to return class scores"
        )
    out = out.detach().to(torch.float64).reshape(passes, rows, -1)  # (passes, N, C)
    if output == "logits":
        return torch.softmax(out, dim=-1)
    return out.clamp_min(0) / out.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-300)


def run_passes(
    owner: str,
    net: nn.Module,
    x: Batch,
    order: Sequence[int],
    chunk: int,
    output: str,
    setup: Callable[[int, Sequence[int]], contextlib.AbstractContextManager[Any]],
    warn_same: bool = True,
    probe: bool = False,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Prediction:
    """The passes ``order``, ``chunk`` per forward; one per forward when a layer sees
    rows that are not the passes' examples. Warns when every pass is identical (unless
    ``warn_same`` is false: the caller said why already). ``probe``: run the first
    pass alone (layers that group rows by pass record their one-pass rows)."""
    try:
        return _run_chunks(owner, net, x, order, chunk, output, setup, warn_same, probe, output_fn)
    except MCLayoutError:
        if chunk == 1:
            raise
        return _run_chunks(owner, net, x, order, 1, output, setup, warn_same, probe, output_fn)


def _bounds(total: int, chunk: int, probe: bool) -> list[tuple[int, int]]:
    """``[start, stop)`` of each forward's passes; with ``probe`` the first forward is
    one pass alone (the layers' one-pass rows, see :func:`pass_counts`)."""
    first = 1 if probe and chunk > 1 else 0
    out = [(0, 1)] if first else []
    out += [(s, min(s + chunk, total)) for s in range(first, total, chunk)]
    return out


def _run_chunks(
    owner: str,
    net: nn.Module,
    x: Batch,
    order: Sequence[int],
    chunk: int,
    output: str,
    setup: Callable[[int, Sequence[int]], contextlib.AbstractContextManager[Any]],
    warn_same: bool,
    probe: bool,
    output_fn: Callable[[Any], Tensor] | None,
) -> Prediction:
    acc = _Accumulator()
    rows = batch_rows(owner, x)
    first: Tensor | None = None
    differ = False
    with torch.no_grad():
        for start, stop in _bounds(len(order), chunk, probe):
            ids = order[start:stop]
            batch = _repeat(x, len(ids))  # (passes * N, *)
            with setup(start, ids):
                out = net(**batch) if isinstance(batch, Mapping) else net(batch)
            scores = _scores(owner, out, output_fn)
            probs = _probs(owner, scores, len(ids), rows, output)
            if not differ:
                first = probs[0] if first is None else first
                differ = not bool((probs == first).all())
            acc.add(probs)
    if warn_same and len(order) > 1 and not differ:
        warnings.warn(
            f"{owner}: all {len(order)} passes gave identical outputs, so variance and "
            "mutual_info are 0: no pass's dropout changed the output (dropout skipped "
            "by a fused path, p=0, subnetworks with the same masks, or a dropout whose "
            "output is not used)",
            UserWarning,
            stacklevel=4,
        )
    return acc.result()
