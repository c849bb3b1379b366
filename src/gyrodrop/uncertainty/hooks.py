"""Monte-Carlo hooks: what the prediction functions switch on in a model while they
run it several times (one subnetwork's masks per pass for the gyro layers, one
decision per sample for stochastic depth, stochastic dropouts in an eval model, a
seeded random state), each restored afterwards."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from gyrodrop.gyro import apply_group_masks
from gyrodrop.schedule import SteppedModule
from gyrodrop.scheduled import ScheduledModule, SubnetLayer
from gyrodrop.stochastic_depth import (
    MCDraws,
    MCLayoutError,
    StochasticDepth,
)

__all__ = ["gyro_passes", "mc_draws", "stochastic_eval", "seeded_rng", "count_calls"]


# --------------------------------------------------------------------------------------
# Gyro layers: masks of one subnetwork, applied per pass by hooks.


def gyro_layers(net: nn.Module) -> list[ScheduledModule]:
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


def resolve_pairing(owner: str, layers: Sequence[ScheduledModule], pairing: str) -> tuple[str, str]:
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


class Members:
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


def pass_counts(
    t: Tensor, passes: int, rows: int, layer: nn.Module, single: dict[int, int]
) -> list[int]:
    """Rows of each pass in ``layer``'s input ``t``.

    One pass: all of ``t``'s rows (recorded in ``single``). Several: ``rows`` each, when
    ``t`` has ``passes * rows`` rows and had ``rows`` with one pass (so dim 0 is the
    examples, pass-major; a sequence-first ``(T, B, H)`` layout with ``T == passes * B``
    is not mistaken for it); any other layout raises :class:`MCLayoutError`, and the
    passes then run one per forward."""
    n = t.shape[0] if t.dim() > 0 else 0
    if passes == 1:
        single.setdefault(id(layer), n)
        return [n]
    if n == passes * rows and single.get(id(layer), rows) == rows:
        return [rows] * passes
    raise MCLayoutError(f"a layer saw {n} rows for {passes} passes of {rows} examples")


@contextlib.contextmanager
def gyro_passes(
    members: Members,
    chunk: Sequence[int],
    rows: int,
    calls: dict[int, int] | None = None,
    single: dict[int, int] | None = None,
) -> Iterator[None]:
    """While active, each gyro layer (in eval mode) multiplies pass ``i``'s rows by the
    mask of member ``chunk[i]`` (see :func:`pass_counts`, ``single`` its record of
    one-pass rows); ``calls`` counts the calls per layer (by ``id``)."""
    handles = []
    passes = len(chunk)
    single = {} if single is None else single

    def masked(index: int, layer: ScheduledModule) -> Callable[[Tensor], Tensor]:
        cache: dict[tuple[Any, ...], Tensor] = {}

        def apply(t: Tensor) -> Tensor:
            if calls is not None:
                calls[id(layer)] = calls.get(id(layer), 0) + 1
            counts = pass_counts(t, passes, rows, layer, single)
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
def count_calls(modules: Sequence[nn.Module], calls: dict[int, int]) -> Iterator[None]:
    """Count the forward calls of ``modules`` (by ``id``) into ``calls``."""

    def hook(m: nn.Module, _args: Any) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def warn_uncalled(
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


def fused_parents(net: nn.Module) -> list[nn.Module]:
    """Modules whose own ``training`` flag only chooses a fused inference path that
    skips their dropout children (``nn.TransformerEncoderLayer``): set during the
    passes so that the children run."""
    return [m for m in net.modules() if isinstance(m, nn.TransformerEncoderLayer)]


# --------------------------------------------------------------------------------------
# Modes, steps and random state, restored afterwards.


@contextlib.contextmanager
def stochastic_eval(net: nn.Module, active: Sequence[nn.Module]) -> Iterator[None]:
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
def seeded_rng(seed: int, device: torch.device, needed: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def mc_draws(
    modules: Sequence[StochasticDepth],
    rows: int,
    first: int,
    key: int,
    passes: int | None = None,
    single: dict[int, int] | None = None,
) -> Iterator[None]:
    """Within the block, each :class:`StochasticDepth` in ``modules`` draws one decision
    per Monte-Carlo sample (``rows`` consecutive rows; the batch starts at sample
    ``first``; ``passes`` samples in the batch, when known; ``single``: see
    :class:`~gyrodrop.stochastic_depth.MCDraws`) keyed by ``key``, instead of
    following its step. Block mode then also computes the branch (different samples
    decide differently)."""
    state = MCDraws(rows=rows, first=first, key=key, passes=passes, single=single)
    previous = [m.set_mc_draws(state) for m in modules]
    try:
        yield
    finally:
        for m, prev in zip(modules, previous, strict=True):
            m.set_mc_draws(prev)
