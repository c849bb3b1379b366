"""Running the Monte-Carlo passes in chunks of samples and summarizing them: batches
(tensors or keyword mappings), the rows per forward, the model's outputs turned into
class probabilities (or regression means and variances) and their running sums."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from gyrodrop._validation import check_choice, check_int
from gyrodrop.stochastic_depth import (
    MCLayoutError,
)

__all__ = [
    "Batch",
    "Prediction",
    "run_passes",
    "ROW_BUDGET",
    "PAIRINGS",
    "OUTPUTS",
    "PROB_TOL",
    "check_temperature",
]

ROW_BUDGET = 2048  # rows per forward when batch_samples is not given

#: How subnetwork ``k`` pairs the layers' masks (see :func:`subnet_ensemble_predict`).
Pairing = Literal["auto", "trained", "index"]
PAIRINGS: tuple[Pairing, ...] = ("auto", "trained", "index")
#: What the model returns: logits (softmaxed here; log-probabilities too),
#: probabilities, or a regression's mean (and optionally its variance).
Output = Literal["logits", "probs", "regression"]
OUTPUTS: tuple[Output, ...] = ("logits", "probs", "regression")
#: ``output="probs"``: how far below 0 a value and how far from 1 a row's sum may be
#: (float32/float64 outputs; 10 times more for float16/bfloat16).
PROB_TOL = 1e-3
#: Regression: variances are clamped at this floor in the entropy (nats stay finite).
VAR_FLOOR = 1e-12


class _Summary(NamedTuple):
    mean: Tensor
    variance: Tensor
    entropy: Tensor
    mutual_info: Tensor


class Prediction(_Summary):
    """Summary of ``S`` stochastic passes over ``N`` examples.

    A named tuple of four tensors (``mean, variance, entropy, mutual_info = pred``).
    Classification (``output="logits"`` or ``"probs"``, ``C`` classes):

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
        kind: ``"classification"`` or ``"regression"``; not a tuple field.
        epistemic, aleatoric: regression only (else ``None``), see below.

    Regression (``output="regression"``; the model returns ``D`` outputs per row, see
    :func:`~gyrodrop.mc_predict`), with ``mu_s`` and ``v_s`` pass ``s``'s mean and
    own predicted variance (``v_s = 0`` when the model predicts none):

    - ``mean``: ``(1/S) sum_s mu_s``, the shape of one pass's mean, ``(N,)`` or
      ``(N, D)``;
    - ``epistemic``: the variance over passes of ``mu_s`` (divided by ``S``);
      ``aleatoric``: ``(1/S) sum_s v_s``; both shaped like ``mean``;
    - ``variance``: the predictive variance ``epistemic + aleatoric`` (the variance of
      the mixture of the passes' Gaussians), shaped like ``mean``;
    - ``entropy``: the differential entropy in nats of the Gaussian with that
      variance, summed over outputs, ``(N,)`` (variance floored at ``1e-12``; it can be
      negative);
    - ``mutual_info``: ``0.5 sum_d log(1 + epistemic_d / aleatoric_d)`` in nats, ``(N,)``,
      the information between the output and the pass when both are Gaussian (the
      model's variance is the noise); ``NaN`` when the model predicts no variance
      (then the variance is the score to use).

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
    kind: str
    epistemic: Tensor | None
    aleatoric: Tensor | None

    def __new__(
        cls,
        mean: Tensor,
        variance: Tensor,
        entropy: Tensor,
        mutual_info: Tensor,
        pairing: str | None = None,
        pairing_reason: str = "",
        kind: str = "classification",
        epistemic: Tensor | None = None,
        aleatoric: Tensor | None = None,
    ) -> Prediction:
        self = super().__new__(cls, mean, variance, entropy, mutual_info)
        self.pairing = pairing
        self.pairing_reason = pairing_reason
        self.kind = kind
        self.epistemic = epistemic
        self.aleatoric = aleatoric
        return self

    @classmethod
    def from_passes(cls, probs: Tensor) -> Prediction:
        """The summary of class probabilities ``(S, N, C)`` computed elsewhere: ``S``
        members of a deep ensemble, say, whose rows sum to 1 (checked as for
        ``output="probs"``). Then :func:`~gyrodrop.uncertainty_metrics` scores it.

        Example:
            >>> import torch
            >>> from gyrodrop import Prediction
            >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 members, 1 row
            >>> pred = Prediction.from_passes(p)
            >>> pred.mean.tolist(), round(float(pred.mutual_info), 4)
            ([[0.5, 0.5]], 0.6931)
        """
        if not isinstance(probs, Tensor) or probs.dim() != 3 or 0 in probs.shape:
            shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
            raise ValueError(
                f"Prediction.from_passes: probs must be a tensor (S, N, C) of class "
                f"probabilities with S, N, C >= 1, got {shape}"
            )
        s, n, c = probs.shape
        acc = _Accumulator()
        owner = "Prediction.from_passes"
        acc.add(_probs(owner, probs.reshape(s * n, c), s, n, "probs"))
        return acc.result()

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle keep the attributes
        return (
            *self,
            self.pairing,
            self.pairing_reason,
            self.kind,
            self.epistemic,
            self.aleatoric,
        )


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


def _scores(
    owner: str, out: Any, output_fn: Callable[[Any], Tensor] | None, output: str = "logits"
) -> Any:
    """The class scores in a model's output: ``output_fn(out)``, the tensor itself, a
    regression's ``(mean, variance)`` pair, or the ``logits`` attribute of a
    ``ModelOutput``-like object."""
    if output_fn is not None:
        return output_fn(out)
    if isinstance(out, Tensor):
        return out
    if output == "regression" and isinstance(out, (tuple, list)):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"{owner}: the model returned a {type(out).__name__} without a tensor .logits; "
        "hint: pass output_fn= (a function from the model's output to class scores)"
    )


def check_temperature(owner: str, temperature: Any, name: str = "temperature") -> float:
    """A softmax temperature: a finite real number > 0, returned as ``float``.

    Raises:
        ValueError: e.g. ``"mc_predict: temperature must be a finite number > 0, got 0"``.
    """
    if isinstance(temperature, Tensor) and temperature.numel() == 1:
        temperature = float(temperature)
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_inputs(
    owner: str, model: Any, x: Any, output: str, pairing: str, temperature: Any = 1.0
) -> float:
    """Checks the arguments the prediction functions share; returns the temperature."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    batch_rows(owner, x)
    check_choice(owner, "output", output, OUTPUTS)
    check_choice(owner, "pairing", pairing, PAIRINGS)
    t = check_temperature(owner, temperature)
    if t != 1.0 and output != "logits":
        raise ValueError(
            f"{owner}: temperature divides logits before the softmax, so it needs "
            f"output='logits', got output={output!r} with temperature={t:g}"
        )
    return t


def chunk_size(owner: str, batch: Any, total: int, rows: int, name: str = "batch_samples") -> int:
    """Passes per forward: ``batch`` (the user's argument ``name``, an int >= 1) or as
    many as fit in :data:`ROW_BUDGET` rows, at most ``total``."""
    if batch is None:
        return max(1, min(total, ROW_BUDGET // rows))
    check_int(owner, name, batch, 1)
    return min(int(batch), total)


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


class _Accumulator:
    """Running sums over passes, in float64: of ``p``, of ``p**2`` and of ``H[p]``."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: list[Tensor] = []

    def _add(self, *sums: Tensor) -> None:
        self.sums = (
            list(sums) if not self.sums else [a + b for a, b in zip(self.sums, sums, strict=True)]
        )

    def add(self, probs: Tensor, _extra: Tensor | None = None) -> None:  # (passes, N, C)
        self._add(probs.sum(0), (probs * probs).sum(0), _entropy(probs).sum(0))
        self.n += probs.shape[0]

    def result(self) -> Prediction:
        if not self.sums:
            raise RuntimeError("_Accumulator: no passes were added")
        sum_p, sum_p2, sum_h = self.sums
        mean = sum_p / self.n
        variance = (sum_p2 / self.n - mean * mean).clamp_min(0).mean(-1)
        entropy = _entropy(mean).clamp_min(0)
        mutual = torch.minimum((entropy - sum_h / self.n).clamp_min(0), entropy)
        f = torch.float32
        return Prediction(mean.to(f), variance.to(f), entropy.to(f), mutual.to(f))


class _RegressionAccumulator(_Accumulator):
    """Running sums over passes, in float64: of ``mu``, of ``mu**2`` and of the model's
    own variance ``v`` (when it gives one)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape  # one pass's mean, (N,) or (N, D)
        self.has_var: bool | None = None

    def add(self, mu: Tensor, var: Tensor | None = None) -> None:  # (passes, N, D)
        if self.has_var is None:
            self.has_var = var is not None
        v = torch.zeros_like(mu) if var is None else var
        self._add(mu.sum(0), (mu * mu).sum(0), v.sum(0))
        self.n += mu.shape[0]

    def result(self) -> Prediction:
        if not self.sums:
            raise RuntimeError("_RegressionAccumulator: no passes were added")
        sum_mu, sum_mu2, sum_v = self.sums
        mean = sum_mu / self.n  # (N, D)
        epistemic = (sum_mu2 / self.n - mean * mean).clamp_min(0)
        aleatoric = sum_v / self.n
        total = epistemic + aleatoric
        entropy = (0.5 * torch.log(2 * math.pi * math.e * total.clamp_min(VAR_FLOOR))).sum(-1)
        if self.has_var:
            ratio = epistemic / aleatoric.clamp_min(VAR_FLOOR)
            mutual = 0.5 * torch.log1p(torch.where(epistemic > 0, ratio, 0.0)).sum(-1)
        else:
            mutual = torch.full_like(entropy, math.nan)

        def out(t: Tensor) -> Tensor:
            return t.reshape(self.shape).to(torch.float32)

        f = torch.float32
        return Prediction(
            out(mean),
            out(total),
            entropy.to(f),
            mutual.to(f),
            kind="regression",
            epistemic=out(epistemic),
            aleatoric=out(aleatoric),
        )


def _shape_error(owner: str, what: str, out: Any, passes: int, rows: int) -> ValueError:
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    return ValueError(
        f"{owner}: the model must return {what}; got {shape} for {passes * rows} rows; "
        "hint: wrap the model (or pass output_fn=) to return it"
    )


def _probs(
    owner: str, out: Any, passes: int, rows: int, output: str, temperature: float = 1.0
) -> Tensor:
    """The class probabilities ``(passes, N, C)`` (float64) of one forward's output."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != passes * rows:
        raise _shape_error(owner, "a tensor of shape (rows, classes)", out, passes, rows)
    half = out.dtype in (torch.float16, torch.bfloat16)
    out = out.detach().to(torch.float64).reshape(passes, rows, -1)  # (passes, N, C)
    if output == "logits":
        return torch.softmax(out / temperature, dim=-1)
    tol = PROB_TOL * (10 if half else 1)
    low = float(out.min()) if out.numel() else 0.0
    sums = out.sum(-1)
    worst = float(sums.flatten()[(sums - 1).abs().argmax()]) if sums.numel() else 1.0
    if not (low >= -tol and abs(worst - 1) <= tol):
        found = f"a value of {low:.4g}" if not low >= -tol else f"a row summing to {worst:.4g}"
        raise ValueError(
            f"{owner}: output='probs' needs probabilities (every value >= 0 and every row "
            f"summing to 1, both within {tol:g}), but the model returned {found}; "
            "hint: output='logits' for logits or log-probabilities (softmax is applied)"
        )
    return out.clamp_min(0) / out.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-300)


def _regression(owner: str, out: Any, passes: int, rows: int) -> tuple[Tensor, Tensor | None]:
    """A regression's means ``(passes, N, D)`` and own variances (``None`` when the
    model returns means only), float64, from ``mean`` or ``(mean, variance)``."""
    what = "a mean (rows,) or (rows, D), or a (mean, variance) pair of them"
    var: Any = None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise _shape_error(owner, what, out, passes, rows)
        out, var = out
    if not isinstance(out, Tensor) or out.dim() not in (1, 2) or out.shape[0] != passes * rows:
        raise _shape_error(owner, what, out, passes, rows)
    mu = out.detach().to(torch.float64).reshape(passes, rows, -1)
    if var is None:
        return mu, None
    if not isinstance(var, Tensor) or var.shape != out.shape:
        shape = tuple(var.shape) if isinstance(var, Tensor) else type(var).__name__
        raise ValueError(
            f"{owner}: output='regression' with a (mean, variance) pair needs the variance "
            f"shaped like the mean {tuple(out.shape)}, got {shape}"
        )
    v = var.detach().to(torch.float64).reshape(passes, rows, -1)
    if v.numel() and not bool((v >= 0).all()):
        raise ValueError(
            f"{owner}: output='regression': the model's variance must be >= 0, got "
            f"{float(v.min()):.4g}; hint: return exp(log_variance) or softplus(raw), "
            "not the log-variance itself"
        )
    return mu, v


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
    temperature: float = 1.0,
) -> Prediction:
    """The passes ``order``, ``chunk`` per forward; one per forward when a layer sees
    rows that are not the passes' examples. Warns when every pass is identical (unless
    ``warn_same`` is false: the caller said why already). ``probe``: run the first
    pass alone (layers that group rows by pass record their one-pass rows)."""

    def run(per_forward: int) -> Prediction:
        return _run_chunks(
            owner,
            net,
            x,
            order,
            per_forward,
            output,
            setup,
            warn_same,
            probe,
            output_fn,
            temperature,
        )

    try:
        return run(chunk)
    except MCLayoutError:
        if chunk == 1:
            raise
        return run(1)


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
    temperature: float,
) -> Prediction:
    acc: _Accumulator | None = None if output == "regression" else _Accumulator()
    rows = batch_rows(owner, x)
    first: Tensor | None = None
    differ = False
    with torch.no_grad():
        for start, stop in _bounds(len(order), chunk, probe):
            ids = order[start:stop]
            batch = _repeat(x, len(ids))  # (passes * N, *)
            with setup(start, ids):
                out = net(**batch) if isinstance(batch, Mapping) else net(batch)
            scores = _scores(owner, out, output_fn, output)
            extra: Tensor | None = None
            if output == "regression":
                values, extra = _regression(owner, scores, len(ids), rows)
                if acc is None:
                    mean_out = scores[0] if isinstance(scores, (tuple, list)) else scores
                    acc = _RegressionAccumulator((rows, *tuple(mean_out.shape[1:])))
            else:
                values = _probs(owner, scores, len(ids), rows, output, temperature)
            if not differ:
                first = values[0] if first is None else first
                differ = not bool((values == first).all())
            assert acc is not None
            acc.add(values, extra)
    if warn_same and len(order) > 1 and not differ:
        warnings.warn(
            f"{owner}: all {len(order)} passes gave identical outputs, so variance and "
            "mutual_info are 0: no pass's dropout changed the output (dropout skipped "
            "by a fused path, p=0, subnetworks with the same masks, or a dropout whose "
            "output is not used)",
            UserWarning,
            stacklevel=5,
        )
    assert acc is not None
    return acc.result()
