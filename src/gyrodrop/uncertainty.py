"""Predictive uncertainty from the dropout family: Monte-Carlo dropout and the
deterministic ensemble of gyro subnetworks.

Both run the model several times on the same inputs (repeated along the batch dim, a
chunk of samples per forward) and summarize the class probabilities ``p_s(c | x)`` of
the ``S`` passes as a :class:`Prediction`:

- ``mean``: ``(1/S) sum_s p_s``, the predictive distribution;
- ``variance``: the variance over passes of ``p_s(c | x)``, averaged over classes;
- ``entropy``: ``H[mean]``, total uncertainty;
- ``mutual_info``: ``H[mean] - (1/S) sum_s H[p_s]`` (BALD), the part due to
  disagreement between passes (epistemic); ``0 <= mutual_info <= entropy``.

Only the dropout family is stochastic during the passes; everything else runs in
``eval()`` mode (BatchNorm uses and keeps its running statistics). The model's modes,
its step counters and the global random state are exactly as before afterwards, also
when a forward raises.

Gyro dropout trained ``num_subnets`` (sigma) fixed subnetworks, so its passes use
*those* rather than fresh random masks: one subnetwork per pass for all rows.
:func:`subnet_ensemble_predict` averages over all of them (or a seeded subset),
deterministically; :func:`mc_predict` draws them without replacement, seeded (all
sigma once each before any repeats).

Which layer mask makes up "subnetwork j" of a model with several gyro layers
(``pairing``): every layer follows its own seeded schedule, and row group ``g`` of step
``t`` trains the combination of the layers' ``g``-th active masks. ``"trained"`` takes
those combinations, position ``j`` of the schedule's stream in the last complete cycle
(each trained together for ``steps_per_set`` steps); it needs every gyro layer to share
``num_subnets``, ``subnets_per_step``, ``steps_per_set``, the consecutive schedule and
the step. ``"index"`` gives every layer its mask ``j mod num_subnets`` (layers with
different sigma cycle through theirs). ``"auto"`` (default): ``"trained"`` when
possible, else ``"index"`` with a warning saying why; the returned
:class:`Prediction` names the pairing used (``pairing``, ``pairing_reason``).

Rows: the passes of one forward are stacked along dim 0 (pass-major). A gyro layer
whose input has ``passes * N`` rows gets one mask per pass; a layer that sees other
rows (a ``(B*T, H)`` flattening, Swin windows, a sequence-first ``(T, B, H)`` layout)
makes the passes run one per forward instead, where its one mask covers all its rows.

Fused inference paths: ``nn.TransformerEncoderLayer`` takes a fused kernel in eval
mode that never calls its dropout children, so during the passes its own ``training``
flag is set (not its children's); ``nn.MultiheadAttention`` with ``dropout > 0`` is
part of the dropout family for :func:`mc_predict` (its attention dropout is sampled).
Dropout layers that are never called in the passes (a parent that applies dropout
functionally, dead modules) and passes that all come out identical are warned about.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from gyrodrop import masks
from gyrodrop._modules import unwrap_model
from gyrodrop._validation import check_choice, check_int, check_seed
from gyrodrop.gyro import apply_group_masks
from gyrodrop.schedule import SteppedModule
from gyrodrop.scheduled import ScheduledModule, SubnetLayer
from gyrodrop.stochastic_depth import (
    StochasticDepth,
    StochasticDepthBlock,
    StochasticDepthLayer,
    _MCLayoutError,
    mc_draws,
)

__all__ = ["Prediction", "mc_predict", "subnet_ensemble_predict", "PAIRINGS", "OUTPUTS"]

#: How subnetwork ``k`` pairs the layers' masks (see :func:`subnet_ensemble_predict`).
Pairing = Literal["auto", "trained", "index"]
PAIRINGS: tuple[Pairing, ...] = ("auto", "trained", "index")
#: What the model returns: logits (softmaxed here) or probabilities.
Output = Literal["logits", "probs"]
OUTPUTS: tuple[Output, ...] = ("logits", "probs")

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_TAG_MC_MEMBERS = 0x66
_TAG_SUBSET = 0x67
_ROW_BUDGET = 2048  # rows per forward when batch_samples is not given


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
# Gyro layers: masks of one subnetwork, applied per pass by hooks.


def _gyro_layers(net: nn.Module) -> list[ScheduledModule]:
    """The gyro family: scheduled modules that give the mask of one subnetwork
    (:class:`~gyrodrop.scheduled.SubnetLayer`: GyroDropout, BlockGyroLinear,
    GyroDropBlock2d)."""
    return [
        m for m in net.modules() if isinstance(m, ScheduledModule) and isinstance(m, SubnetLayer)
    ]


def _as_row_mask(mask: Tensor, rest: int) -> Tensor:
    """Left-pad a mask with 1-dims so it has ``rest`` dims (one row of the input)."""
    if mask.dim() >= rest:
        return mask
    return mask.reshape((1,) * (rest - mask.dim()) + tuple(mask.shape))


def _common_schedule(layers: Sequence[ScheduledModule]) -> str | None:
    """``None`` when ``pairing="trained"`` is possible, else why not."""
    keys = {
        (m.num_subnets, m.subnets_per_step, m.steps_per_set, m.schedule, m.current_step())
        for m in layers
    }
    if any(m.schedule != "consecutive" for m in layers):
        return "a layer uses schedule='random' (no fixed combinations)"
    if len(keys) > 1:
        return (
            "the gyro layers differ in (num_subnets, subnets_per_step, steps_per_set, "
            f"schedule, step): {sorted(keys)[:3]}"
        )
    return None


def _resolve_pairing(
    owner: str, layers: Sequence[ScheduledModule], pairing: str
) -> tuple[str, str]:
    """The pairing to use and why (``""`` when it was asked for); ``"auto"`` falling
    back to ``"index"`` warns."""
    why = _common_schedule(layers)
    if pairing == "trained" and why is not None:
        raise ValueError(
            f"{owner}: pairing='trained' needs one shared schedule, but {why}; "
            "hint: pairing='index'"
        )
    if pairing != "auto":
        return pairing, ""
    if why is None:
        return "trained", "pairing='auto': the gyro layers share one schedule"
    reason = f"pairing='auto' used 'index' because {why}"
    warnings.warn(
        f"{owner}: {reason}; member j takes every layer's subnetwork j mod num_subnets, "
        "combinations that were not trained together; pass pairing='index' to silence",
        UserWarning,
        stacklevel=3,
    )
    return "index", reason


class _Members:
    """Model-level subnetworks: member ``j`` -> each gyro layer's subnetwork id."""

    def __init__(self, layers: Sequence[ScheduledModule], pairing: str) -> None:
        self.layers = list(layers)
        self.pairing = pairing
        self.count = max(m.num_subnets for m in layers)
        self._sets: dict[tuple[int, int], list[int]] = {}
        if pairing == "trained":
            ref = layers[0]
            sigma, tau = ref.num_subnets, ref.subnets_per_step
            step = ref.current_step()
            cycle = 0
            if step > 0:
                end = (ref.subnet_schedule.set_index(step - 1) + 1) * tau
                cycle = max(end // sigma - 1, 0)  # the last complete cycle (else the first)
            self._first = cycle * sigma

    def layer_id(self, index: int, j: int) -> int:
        layer = self.layers[index]
        if self.pairing == "index":
            return j % layer.num_subnets
        tau = layer.subnets_per_step
        position = self._first + j
        key = (index, position // tau)
        if key not in self._sets:
            ids = layer.subnet_schedule.subnets(layer.current_schedule_seed(), position // tau)
            self._sets[key] = ids.tolist()
        return self._sets[key][position % tau]


def _pass_counts(
    t: Tensor, passes: int, rows: int, layer: nn.Module, single: dict[int, int]
) -> list[int]:
    """Rows of each pass in ``layer``'s input ``t``.

    One pass: all of ``t``'s rows (recorded in ``single``). Several: ``rows`` each, when
    ``t`` has ``passes * rows`` rows and had ``rows`` with one pass (so dim 0 is the
    examples, pass-major; a sequence-first ``(T, B, H)`` layout with ``T == passes * B``
    is not mistaken for it); any other layout raises :class:`_MCLayoutError`, and the
    passes then run one per forward."""
    n = t.shape[0] if t.dim() > 0 else 0
    if passes == 1:
        single.setdefault(id(layer), n)
        return [n]
    if n == passes * rows and single.get(id(layer), rows) == rows:
        return [rows] * passes
    raise _MCLayoutError(f"a layer saw {n} rows for {passes} passes of {rows} examples")


@contextlib.contextmanager
def _gyro_passes(
    members: _Members,
    chunk: Sequence[int],
    rows: int,
    calls: dict[int, int] | None = None,
    single: dict[int, int] | None = None,
) -> Iterator[None]:
    """While active, each gyro layer (in eval mode) multiplies pass ``i``'s rows by the
    mask of member ``chunk[i]`` (see :func:`_pass_counts`, ``single`` its record of
    one-pass rows); ``calls`` counts the calls per layer (by ``id``)."""
    handles = []
    passes = len(chunk)
    single = {} if single is None else single

    def masked(index: int, layer: ScheduledModule) -> Callable[[Tensor], Tensor]:
        cache: dict[tuple[Any, ...], Tensor] = {}

        def apply(t: Tensor) -> Tensor:
            if calls is not None:
                calls[id(layer)] = calls.get(id(layer), 0) + 1
            counts = _pass_counts(t, passes, rows, layer, single)
            key = (tuple(t.shape[1:]), t.dtype, t.device)
            if key not in cache:
                stacked = [
                    _as_row_mask(
                        cast(SubnetLayer, layer).subnet_mask(members.layer_id(index, j), t),
                        t.dim() - 1,
                    )
                    for j in chunk
                ]
                cache[key] = torch.stack(stacked)  # (passes, *row mask)
            return apply_group_masks(t, cache[key], counts)

        return apply

    try:
        for index, layer in enumerate(members.layers):
            fn = masked(index, layer)
            if layer.mask_side == "input":
                handles.append(
                    layer.register_forward_pre_hook(
                        lambda _m, args, fn=fn: (fn(args[0]), *args[1:])
                    )
                )
            else:
                handles.append(layer.register_forward_hook(lambda _m, _a, out, fn=fn: fn(out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _count_calls(modules: Sequence[nn.Module], calls: dict[int, int]) -> Iterator[None]:
    """Count the forward calls of ``modules`` (by ``id``) into ``calls``."""

    def hook(m: nn.Module, _args: Any) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _warn_uncalled(
    owner: str, net: nn.Module, modules: Sequence[nn.Module], calls: dict[int, int]
) -> None:
    """Warn about dropout-family modules never called during the passes."""
    ids = {id(m) for m in modules if calls.get(id(m), 0) == 0}
    if not ids:
        return
    names = [name or "(the model)" for name, m in net.named_modules() if id(m) in ids]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    warnings.warn(
        f"{owner}: {len(names)} dropout layer(s) were never called during the passes and "
        f"add no randomness: {shown}; a parent module may apply dropout functionally "
        "or take a fused inference path, or the module is unused",
        UserWarning,
        stacklevel=3,
    )


def _fused_parents(net: nn.Module) -> list[nn.Module]:
    """Modules whose own ``training`` flag only chooses a fused inference path that
    skips their dropout children (``nn.TransformerEncoderLayer``): set during the
    passes so that the children run."""
    return [m for m in net.modules() if isinstance(m, nn.TransformerEncoderLayer)]


# --------------------------------------------------------------------------------------
# Modes, steps and random state, restored afterwards.


@contextlib.contextmanager
def _stochastic_eval(net: nn.Module, active: Sequence[nn.Module]) -> Iterator[None]:
    """``net`` in eval mode except the modules in ``active`` (flags set one by one, not
    recursively); every module's mode and every step counter restored on exit."""
    modes = [(m, m.training) for m in net.modules()]
    steps = [(m, m.step.detach().clone()) for m in net.modules() if isinstance(m, SteppedModule)]
    try:
        net.eval()
        for m in active:
            m.training = True
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for m, value in steps:
                m.step.copy_(value)


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device, needed: bool) -> Iterator[None]:
    """Seed the generators of the CPU and of ``device`` inside a fork of the global
    random state (restored on exit), for ``nn.Dropout``."""
    if not needed:
        yield
        return
    accel = device.type not in ("cpu", "meta")
    devices = [device.index if device.index is not None else 0] if accel else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accel else "cuda"):
        torch.default_generator.manual_seed(seed)
        if accel:
            module = getattr(torch, device.type)
            with module.device(devices[0]):
                module.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------
# Running the passes and summarizing them.


#: A batch: a tensor ``(N, *)`` (``model(x)``) or a mapping of keyword arguments
#: (``model(**x)``, e.g. ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
Batch = Tensor | Mapping[str, Any]


def _batch_rows(owner: str, x: Any) -> int:
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


def _batch_device(x: Batch) -> torch.device:
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


def _check_inputs(owner: str, model: Any, x: Any, output: str, pairing: str) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    _batch_rows(owner, x)
    check_choice(owner, "output", output, OUTPUTS)
    check_choice(owner, "pairing", pairing, PAIRINGS)


def _chunk_size(owner: str, batch: Any, total: int, rows: int) -> int:
    if batch is None:
        return max(1, min(total, _ROW_BUDGET // rows))
    check_int(owner, "batch_samples", batch, 1)
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


def _run(
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
    except _MCLayoutError:
        if chunk == 1:
            raise
        return _run_chunks(owner, net, x, order, 1, output, setup, warn_same, probe, output_fn)


def _bounds(total: int, chunk: int, probe: bool) -> list[tuple[int, int]]:
    """``[start, stop)`` of each forward's passes; with ``probe`` the first forward is
    one pass alone (the layers' one-pass rows, see :func:`_pass_counts`)."""
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
    rows = _batch_rows(owner, x)
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


# --------------------------------------------------------------------------------------
# Public API.


def mc_predict(
    model: nn.Module,
    x: Batch,
    samples: int = 30,
    *,
    seed: int = 0,
    batch_samples: int | None = None,
    output: Output = "logits",
    pairing: Pairing = "auto",
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Prediction:
    """Monte-Carlo dropout: ``samples`` stochastic passes with only the dropout family
    active, summarized as a :class:`Prediction`.

    Active during the passes: ``nn.Dropout`` (and ``Dropout1d/2d/3d``,
    ``AlphaDropout``), the attention dropout of ``nn.MultiheadAttention``,
    :class:`~gyrodrop.GyroDropout` and ``BlockGyroLinear`` (one
    trained subnetwork per pass, drawn without replacement; see the module docstring),
    :class:`~gyrodrop.StochasticDepth` (one decision per pass in block mode, per example
    and pass in sample mode), and any other gyrodrop stepped module (in training mode).
    All other modules are in eval mode; BatchNorm statistics are untouched;
    ``nn.TransformerEncoderLayer`` leaves its fused inference path so that its dropout
    children run.

    Nothing leaks: module modes, step counters and the global random state are restored
    (also on an exception). ``nn.Dropout`` draws from generators seeded with ``seed``
    inside a fork of the global state.

    Args:
        model: a classifier returning class scores ``(rows, C)`` (DDP /
            ``torch.compile`` wrappers are looked through).
        x: inputs, ``(N, *)``, or a dict of keyword arguments (``model(**x)``, e.g.
            ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
        samples: number of passes ``S`` (>= 1).
        seed: the same seed gives the same result. Without ``nn.Dropout`` the result
            does not depend on ``batch_samples`` either.
        batch_samples: passes per forward (``x`` repeated along dim 0); default: as many
            as fit in 2048 rows. Lower it when memory is short.
        output: ``"logits"`` (softmax is applied; right for log-probabilities too) or
            ``"probs"``.
        pairing: how gyro layers combine into subnetworks (module docstring).
        output_fn: maps the model's output to class scores ``(rows, C)``; default: the
            output itself, or its ``.logits`` (Hugging Face ``ModelOutput``).

    Returns:
        A :class:`Prediction` of ``N`` examples (with the gyro ``pairing`` used). Warns
        when the model has no dropout layer, when a dropout layer is never called in the
        passes, when all passes are identical, and when ``pairing="auto"`` falls back
        to ``"index"``.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        >>> pred = gyrodrop.mc_predict(net, torch.randn(5, 4), samples=20, seed=1)
        >>> pred.mean.shape, bool((pred.mutual_info <= pred.entropy + 1e-6).all())
        (torch.Size([5, 3]), True)
    """
    owner = "mc_predict"
    _check_inputs(owner, model, x, output, pairing)
    check_int(owner, "samples", samples, 1)
    seed = check_seed(owner, seed)
    net = unwrap_model(model)
    chunk = _chunk_size(owner, batch_samples, samples, _batch_rows(owner, x))

    gyro = _gyro_layers(net)
    gyro_ids = {id(m) for m in gyro}
    dropouts = [m for m in net.modules() if isinstance(m, _DROPOUTS)]
    attention = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0]
    depths = [m for m in net.modules() if isinstance(m, StochasticDepth)]
    wrappers = [
        m for m in net.modules() if isinstance(m, (StochasticDepthBlock, StochasticDepthLayer))
    ]
    others = [
        m
        for m in net.modules()
        if isinstance(m, SteppedModule)
        and id(m) not in gyro_ids
        and not isinstance(m, StochasticDepth)
    ]
    stochastic = bool(gyro or dropouts or attention or depths or others)
    if not stochastic:
        warnings.warn(
            f"{owner}: the model has no dropout-family layer; every pass is the same "
            "(mutual_info is 0)",
            UserWarning,
            stacklevel=2,
        )
    used, reason = _resolve_pairing(owner, gyro, pairing) if gyro else (None, "")
    members = _Members(gyro, used) if used is not None else None
    if members is not None:
        # Pass s uses member perm_r[s mod M] of round r = s // M: every member once
        # before any repeats.
        m_count = members.count
        mix = masks.mix_keys(seed, _TAG_MC_MEMBERS)
        rounds = [
            masks.seeded_permutation(mix, _TAG_MC_MEMBERS, r, m_count).tolist()
            for r in range((samples + m_count - 1) // m_count)
        ]
        draws = [rounds[s // m_count][s % m_count] for s in range(samples)]
    else:
        draws = list(range(samples))
    mc_key = masks.mix_keys(seed, masks.TAG_DEPTH)
    rows = _batch_rows(owner, x)
    calls: dict[int, int] = {}
    single: dict[int, int] = {}  # rows each layer saw in a one-pass forward

    @contextlib.contextmanager
    def setup(start: int, ids: Sequence[int]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if members is not None:
                stack.enter_context(_gyro_passes(members, ids, rows, calls, single))
            if depths:
                stack.enter_context(
                    mc_draws(depths, rows, start, mc_key, passes=len(ids), single=single)
                )
            yield

    active = [*dropouts, *attention, *depths, *wrappers, *others, *_fused_parents(net)]
    needs_rng = bool(dropouts or attention or others)
    probe = bool(members is not None or depths)
    with (
        _stochastic_eval(net, active),
        _seeded_rng(seed, _batch_device(x), needs_rng),
        _count_calls(dropouts, calls),
    ):
        result = _run(owner, net, x, draws, chunk, output, setup, stochastic, probe, output_fn)
    _warn_uncalled(owner, net, [*dropouts, *gyro], calls)
    return Prediction(*result, pairing=used, pairing_reason=reason)


def subnet_ensemble_predict(
    model: nn.Module,
    x: Batch,
    subnets: int | Sequence[int] | None = None,
    *,
    seed: int = 0,
    batch_subnets: int | None = None,
    output: Output = "logits",
    pairing: Pairing = "auto",
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Prediction:
    """The ensemble of the gyro subnetworks the model trained: one pass per subnetwork
    (all rows through it), probabilities averaged. Deterministic.

    Every other layer runs in eval mode (``nn.Dropout`` and stochastic depth off,
    BatchNorm on its running statistics); modes and step counters are restored.
    ``mutual_info`` is then the subnetworks' disagreement.

    Args:
        model: a classifier with at least one :class:`~gyrodrop.GyroDropout` or
            ``BlockGyroLinear`` layer, returning class scores ``(rows, C)``.
        x: inputs, ``(N, *)``, or a dict of keyword arguments (``model(**x)``, e.g.
            ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
        subnets: ``None``: all members (``num_subnets``; with ``pairing="index"`` and
            layers of different sigma, the largest); an int ``n``: a seeded subset of
            ``n`` members; a sequence of member ids.
        seed: chooses the subset when ``subnets`` is an int.
        batch_subnets: subnetworks per forward; default: as many as fit in 2048 rows.
        output: ``"logits"`` or ``"probs"``, as in :func:`mc_predict`.
        pairing: ``"auto"``, ``"trained"`` or ``"index"`` (module docstring); the
            returned :class:`Prediction` says which was used and why.
        output_fn: maps the model's output to class scores, as in :func:`mc_predict`.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> net = nn.Sequential(
        ...     nn.Linear(4, 16),
        ...     nn.ReLU(),
        ...     gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=5),
        ...     nn.Linear(16, 3),
        ... )
        >>> a = gyrodrop.subnet_ensemble_predict(net, torch.ones(2, 4))
        >>> b = gyrodrop.subnet_ensemble_predict(net, torch.ones(2, 4))
        >>> bool(torch.equal(a.mean, b.mean))
        True
    """
    owner = "subnet_ensemble_predict"
    _check_inputs(owner, model, x, output, pairing)
    seed = check_seed(owner, seed)
    net = unwrap_model(model)
    gyro = _gyro_layers(net)
    if not gyro:
        raise ValueError(
            f"{owner}: the model has no GyroDropout or BlockGyroLinear layer, so it has no "
            "trained subnetworks; hint: gyrodrop.apply_gyro_dropout(model, ...) before "
            "training, or mc_predict for nn.Dropout models"
        )
    used, reason = _resolve_pairing(owner, gyro, pairing)
    members = _Members(gyro, used)
    m_count = members.count
    if subnets is None:
        chosen = list(range(m_count))
    elif isinstance(subnets, int) and not isinstance(subnets, bool):
        check_int(owner, "subnets", subnets, 1, m_count)
        perm = masks.seeded_permutation(seed, _TAG_SUBSET, 0, m_count)
        chosen = sorted(perm[:subnets].tolist())
    elif isinstance(subnets, Sequence) and not isinstance(subnets, (str, bytes)):
        bad = [
            j
            for j in subnets
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < m_count
        ]
        chosen = [int(j) for j in subnets if not isinstance(j, bool) and isinstance(j, int)]
        if not chosen or bad or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"{owner}: subnets must be distinct ints in [0, {m_count}), got {list(subnets)}"
            )
    else:
        raise ValueError(
            f"{owner}: subnets must be None, an int or a sequence of ints, got {subnets!r}"
        )
    rows = _batch_rows(owner, x)
    chunk = _chunk_size(owner, batch_subnets, len(chosen), rows)
    calls: dict[int, int] = {}
    single: dict[int, int] = {}

    def setup(start: int, ids: Sequence[int]) -> contextlib.AbstractContextManager[Any]:
        return _gyro_passes(members, ids, rows, calls, single)

    with _stochastic_eval(net, _fused_parents(net)):
        result = _run(owner, net, x, chosen, chunk, output, setup, probe=True, output_fn=output_fn)
    _warn_uncalled(owner, net, gyro, calls)
    return Prediction(*result, pairing=used, pairing_reason=reason)
