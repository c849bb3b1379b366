"""Gyro dropout (Lee et al., MLSys 2022): a fixed set of subnetworks, trained in turn.

Plain dropout samples a fresh mask per row per step, so each of astronomically many
subnetworks is trained about once. Gyro dropout pre-selects ``num_subnets`` (sigma)
masks, trains ``subnets_per_step`` (tau) of them at once (the batch split into tau
contiguous row groups, one mask each) and keeps each set for ``steps_per_set``
consecutive steps, so every subnetwork is trained enough to be good.

The work per step is one broadcast multiply: the tau active masks are cached and only
rebuilt when the set changes, so there is no per-element random number generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from gyrodrop import distributed, masks
from gyrodrop._validation import check_bool, check_choice, check_int, check_p, check_seed
from gyrodrop.schedule import Schedule, SubnetSchedule, check_input, check_schedule
from gyrodrop.scheduled import ScheduledModule

__all__ = ["GyroDropout", "gyro_dropout", "subnet_masks", "apply_group_masks"]

#: How kept values are scaled: ``1/(1-p)`` (inverted) or by the realized keep rate.
Scale = Literal["inverted", "realized"]
SCALES: tuple[Scale, ...] = ("inverted", "realized")


def _normalize_dims(owner: str, dims: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if dims is None:
        return None
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"{owner}: dims must be None, an int or a tuple of ints, got {dims!r}")
    dims = tuple(dims)
    if 0 in dims:
        raise ValueError(
            f"{owner}: dims must name non-batch dims (1..ndim-1 or negative), got {dims}; "
            "dim 0 is the batch"
        )
    if len(set(dims)) != len(dims):
        raise ValueError(f"{owner}: dims must not repeat a dim, got {dims}")
    return dims


def check_gyro_args(
    owner: str,
    p: Any,
    num_subnets: Any,
    subnets_per_step: Any,
    schedule: Any,
    scale: Any,
    dims: Any,
    seed: Any,
    schedule_seed: Any,
) -> tuple[float, tuple[int, ...] | None]:
    """The one validation of gyro dropout's arguments, shared by :class:`GyroDropout`
    and :func:`gyro_dropout`; returns ``(p, dims)`` normalized. ``ValueError`` names
    the argument and what is allowed."""
    p = check_p(owner, p)
    check_schedule(owner, num_subnets, subnets_per_step, schedule)
    check_choice(owner, "scale", scale, SCALES)
    check_seed(owner, seed)
    if schedule_seed is not None:
        check_seed(owner, schedule_seed, "schedule_seed")
    return p, _normalize_dims(owner, dims)


def mask_shape_for(owner: str, shape: torch.Size, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """Shape of one subnetwork mask for an input of ``shape`` (batch dim excluded):
    the size of each dim the mask spans, 1 where rows share the mask."""
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(
            f"{owner}: input must have a batch dim, shape (B, *), got a 0-d tensor; "
            "hint: x.reshape(1, -1)"
        )
    if dims is None:
        return tuple(shape[1:])
    spanned = set()
    for d in dims:
        if not -ndim < d < ndim:
            raise ValueError(
                f"{owner}: dims={dims} is out of range for an input of shape {tuple(shape)} "
                f"({ndim} dims); dims index non-batch dims 1..{ndim - 1} or -1..-{ndim - 1}; "
                "hint: pass dims=(-1,) for (B, T, F) inputs, dims=(1,) for channel-wise masks"
            )
        spanned.add(d % ndim)
    if 0 in spanned:
        raise ValueError(
            f"{owner}: dims={dims} names the batch dim of an input with {ndim} dims; "
            "the mask spans non-batch dims only"
        )
    return tuple(shape[i] if i in spanned else 1 for i in range(1, ndim))


def subnet_masks(
    seed: int,
    subnets: Tensor,
    mask_shape: tuple[int, ...],
    p: float,
    *,
    scale: Scale = "inverted",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Scaled masks of the given subnetworks, shape ``(len(subnets), *mask_shape)``.

    ``scale="inverted"`` multiplies kept values by ``1/(1-p)``; ``"realized"`` by
    ``numel / kept`` of each mask (the authors' variant), so each mask preserves the
    sum of a constant input exactly.
    """
    numel = 1
    for s in mask_shape:
        numel *= s
    with torch.no_grad():
        keep = masks.element_keep_mask(seed, subnets, numel, p, device=device)
        if scale == "realized":
            kept = keep.sum(dim=1, keepdim=True).clamp_min(1)
            factor = (numel / kept.to(torch.float64)).to(dtype)
            out = keep.to(dtype) * factor
        else:
            out = keep.to(dtype) * (1.0 / (1.0 - p))
    return out.reshape(len(subnets), *mask_shape)


def apply_group_masks(x: Tensor, group_masks: Tensor, counts: Sequence[int]) -> Tensor:
    """Multiply consecutive row groups of ``x`` by their masks.

    ``group_masks`` has shape ``(G, *mask_shape)`` (broadcastable against one row),
    ``counts[g]`` is the number of rows of ``x`` in group ``g``: ``G`` non-negative ints
    summing to ``B = x.shape[0]`` (every row belongs to exactly one group).
    Groups of equal size are handled by one batched multiply each, so a batch divisible
    by the number of groups costs exactly one broadcast multiply.

    Raises:
        ValueError: ``x`` has no batch dim, ``counts`` does not have one entry per mask,
            has a negative entry, or does not sum to ``B`` (rows would be dropped from
            the result or left without a mask).
    """
    if x.dim() == 0:
        raise ValueError("apply_group_masks: x must have a batch dim (B, *), got a 0-d tensor")
    counts = list(counts)
    if len(counts) != group_masks.shape[0] or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts
    ):
        raise ValueError(
            f"apply_group_masks: counts must be {group_masks.shape[0]} non-negative ints "
            f"(one per group mask), got {counts}"
        )
    if sum(counts) != x.shape[0]:
        raise ValueError(
            f"apply_group_masks: counts {counts} sum to {sum(counts)} rows but x has "
            f"{x.shape[0]} rows (dim 0); every row must be in exactly one group"
        )
    rest = x.shape[1:]
    pieces = []
    row, g = 0, 0
    n_groups = len(counts)
    while g < n_groups:
        c = counts[g]
        end = g
        while end < n_groups and counts[end] == c:
            end += 1
        if c > 0:
            n = end - g
            whole = row == 0 and n * c == x.shape[0]
            chunk = (x if whole else x[row : row + n * c]).reshape(n, c, *rest)  # (n, c, *rest)
            m = group_masks[g:end].unsqueeze(1)  # (n, 1, *mask_shape)
            pieces.append((chunk * m).reshape(n * c, *rest))
            row += n * c
        g = end
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return x * group_masks[:0].sum()  # an empty batch: keep autograd and dtype
    return torch.cat(pieces, dim=0)


def gyro_dropout(
    x: Tensor,
    p: float = 0.5,
    *,
    step: int,
    seed: int = 0,
    num_subnets: int = 256,
    subnets_per_step: int = 16,
    steps_per_set: int = 1,
    dims: int | Sequence[int] | None = None,
    schedule: Schedule = "consecutive",
    scale: Scale = "inverted",
    training: bool = True,
    schedule_seed: int | None = None,
) -> Tensor:
    """Functional gyro dropout: stateless, the step is passed in. See :class:`GyroDropout`.

    Every argument is validated as :class:`GyroDropout` validates it (the same checks,
    :func:`check_gyro_args`), whether or not ``training``; ``step`` is an int ``>= 0``
    and ``steps_per_set`` an int ``>= 1``. Rebuilds the active masks on every call; the
    module caches them.

    Raises:
        ValueError: an argument out of range (named in the message).
        TypeError: ``x`` is not a floating-point tensor.
        RuntimeError: in training, ``x`` is batched by ``torch.func.vmap``.
    """
    owner = "gyro_dropout"
    p, dims_t = check_gyro_args(
        owner, p, num_subnets, subnets_per_step, schedule, scale, dims, seed, schedule_seed
    )
    check_int(owner, "steps_per_set", steps_per_set, 1)
    check_int(owner, "step", step, 0)
    check_bool(owner, "training", training)
    if not training:
        return x
    check_input(owner, x)
    mshape = mask_shape_for(owner, x.shape, dims_t)
    if p == 0.0:
        return x
    sched = SubnetSchedule(num_subnets, subnets_per_step, steps_per_set, schedule)
    active = sched.at_step(seed if schedule_seed is None else schedule_seed, step)
    m = subnet_masks(seed, active, mshape, p, scale=scale, dtype=x.dtype, device=x.device)
    start, global_batch = distributed.row_window(x.shape[0])
    counts = distributed.local_group_counts(start, x.shape[0], global_batch, subnets_per_step)
    return apply_group_masks(x, m, counts)


class GyroDropout(ScheduledModule):
    """Drop-in replacement for :class:`torch.nn.Dropout` that trains a fixed set of
    subnetworks (gyro dropout).

    Args:
        p: drop probability of each neuron in a subnetwork mask, in ``[0, 1)``.
        num_subnets: sigma, the number of pre-selected subnetworks.
        subnets_per_step: tau, subnetworks trained at once (one per row group).
        total_steps: the run's number of steps; sets
            ``steps_per_set = max(1, total_steps * tau // sigma)``.
        steps_per_set: steps each set of tau subnetworks stays active (instead of
            ``total_steps``). With neither, 1 and a warning.
        dims: non-batch dims the mask spans; other dims share it. ``None``: all.
            ``(-1,)`` for ``(B, T, F)`` sequences, ``(1,)`` for channel-wise masks
            on ``(B, C, H, W)``.
        schedule: ``"consecutive"`` (the paper's), ``"random"`` (a fresh set per step) or
            ``"replacement"`` (like consecutive, ids drawn with replacement per set, as
            in the authors' code).
        scale: ``"inverted"`` (``1/(1-p)``) or ``"realized"`` (``numel / kept`` per mask).
        seed: seeds the masks (and the schedule unless ``schedule_seed`` is given); a
            buffer, so it is checkpointed.
        auto_step: ``True``: the step advances by itself, once per training step. In a
            model rewritten by :func:`gyrodrop.apply_gyro_dropout` (or any ``apply_*``)
            the model steps all its gyrodrop layers once per training forward of the
            model, however often each layer is called (see
            :func:`gyrodrop.bind_to_optimizer` for one step per optimizer step); a layer
            on its own steps on each of its training calls. ``False``: call
            :func:`gyrodrop.step` after each optimizer step.
        schedule_seed: seeds the order in which subnetworks become active (default:
            ``seed``). Layers that share it train the same network-level subnetworks
            together; :func:`gyrodrop.apply_gyro_dropout` shares it across layers.
        unbatched_ndim: an input with exactly this many dims has no batch dim and is
            masked as a batch of one (one subnetwork mask for all of it), as torch's
            ``Dropout1d`` reads ``(C, L)`` (2) and ``Dropout3d`` ``(C, D, H, W)`` (4);
            :func:`gyrodrop.apply_gyro_dropout` sets it for those. ``None``: dim 0 is
            always the batch.

    Shape: input ``(B, *)`` (or unbatched, see ``unbatched_ndim``), output the same.
    ``eval()``: the identity.

    Steps: ``step`` (a buffer) counts completed training steps; a training forward uses
    the masks of ``step``. A recompute by activation checkpointing (run during the
    backward) replays the masks of the layer's last training forward. ``num_subnets``
    may be as large as 2**62: a set change costs O(tau).

    Raises (forward): ``TypeError`` for an integer or bool input, ``RuntimeError`` in
    training under ``torch.func.vmap`` (see :func:`gyrodrop.schedule.check_input`).

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.GyroDropout(p=0.5, num_subnets=64, subnets_per_step=4, total_steps=1000)
        >>> y = drop(torch.ones(8, 16))
        >>> sorted(set(y.flatten().tolist()))
        [0.0, 2.0]
        >>> bool((y[0] == y[1]).all())  # rows 0-1 form one group: one subnetwork
        True
    """

    def __init__(
        self,
        p: float = 0.5,
        num_subnets: int = 256,
        subnets_per_step: int = 16,
        *,
        total_steps: int | None = None,
        steps_per_set: int | None = None,
        dims: int | Sequence[int] | None = None,
        schedule: Schedule = "consecutive",
        scale: Scale = "inverted",
        seed: int = 0,
        auto_step: bool = True,
        schedule_seed: int | None = None,
        unbatched_ndim: int | None = None,
    ) -> None:
        owner = type(self).__name__
        p, dims_t = check_gyro_args(
            owner, p, num_subnets, subnets_per_step, schedule, scale, dims, seed, schedule_seed
        )
        if unbatched_ndim is not None and (
            isinstance(unbatched_ndim, bool)
            or not isinstance(unbatched_ndim, int)
            or unbatched_ndim < 1
        ):
            raise ValueError(
                f"{owner}: unbatched_ndim must be None or an int >= 1, got {unbatched_ndim!r}"
            )
        super().__init__(
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,
            schedule=schedule,
            seed=seed,
            auto_step=auto_step,
            owner=owner,
            schedule_seed=schedule_seed,
        )
        self.p = p
        self.dims = dims_t
        self.scale = scale
        self.unbatched_ndim = unbatched_ndim

    def extra_repr(self) -> str:
        dims = "" if self.dims is None else f", dims={self.dims}"
        if self.unbatched_ndim is not None:
            dims += f", unbatched_ndim={self.unbatched_ndim}"
        return (
            f"p={self.p}, num_subnets={self.num_subnets}, "
            f"subnets_per_step={self.subnets_per_step}, steps_per_set={self.steps_per_set}, "
            f"schedule={self.schedule}, scale={self.scale}{dims}"
        )

    def hparams(self) -> dict[str, Any]:
        """Sigma, tau, ``steps_per_set``, schedule, ``p``, scale, dims and
        ``unbatched_ndim``."""
        dims = None if self.dims is None else list(self.dims)
        return {
            **super().hparams(),
            "p": self.p,
            "scale": self.scale,
            "dims": dims,
            "unbatched_ndim": self.unbatched_ndim,
        }

    def active_masks(self, x: Tensor, step: int | None = None) -> Tensor:
        """The scaled masks of the set active at ``step`` for inputs shaped like ``x``,
        shape ``(tau, *mask_shape)``; cached until the set changes."""
        step = self._step_arg(step, "active_masks")
        mshape = mask_shape_for(type(self).__name__, x.shape, self.dims)

        def build(seed: int, active: Tensor) -> Tensor:
            return subnet_masks(
                seed, active, mshape, self.p, scale=self.scale, dtype=x.dtype, device=x.device
            )

        masks_: Tensor = self.for_active_set(step, (mshape, x.dtype, x.device), build)
        return masks_

    def subnet_mask(self, k: int, like: Tensor) -> Tensor:
        """The scaled mask of subnetwork ``k`` for inputs shaped like ``like``,
        shape ``mask_shape`` (used by ensembles and diversity analysis).

        Raises ``ValueError`` unless ``k`` is an int in ``[0, num_subnets)``."""
        check_int(type(self).__name__, "k", k, 0, self.num_subnets - 1)
        mshape = mask_shape_for(type(self).__name__, like.shape, self.dims)
        ids = torch.tensor([k], dtype=torch.int64)
        return subnet_masks(
            self.current_seed(),
            ids,
            mshape,
            self.p,
            scale=self.scale,
            dtype=like.dtype,
            device=like.device,
        )[0]

    @torch.compiler.disable
    def _prepare(self, x: Tensor) -> tuple[Tensor, list[int]]:
        step = self.forward_step()
        return self.active_masks(x, step), self.group_counts(x.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.unbatched_ndim is not None and x.dim() == self.unbatched_ndim:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # a batch of one
        owner = type(self).__name__
        check_input(owner, x)
        mask_shape_for(owner, x.shape, self.dims)
        if x.is_meta:
            return x.clone()  # shapes only: no masks, no step
        if self.p == 0.0:
            self.forward_step()
            return x
        group_masks, counts = self._prepare(x)
        return apply_group_masks(x, group_masks, counts)
