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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gyrodrop import distributed, masks
from gyrodrop._validation import check_bool, check_int, check_seed
from gyrodrop.config import SCALES, DropMode, GyroDropoutConfig, Scale, Schedule
from gyrodrop.schedule import SubnetSchedule, check_input
from gyrodrop.scheduled import ScheduledModule

__all__ = ["GyroDropout", "gyro_dropout", "subnet_masks", "apply_group_masks", "Scale", "SCALES"]


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
    seed: int | Tensor,
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
    return _apply_group_masks(x, group_masks, counts)


def _apply_group_masks(x: Tensor, group_masks: Tensor, counts: Sequence[int]) -> Tensor:
    """:func:`apply_group_masks` for counts the layers computed (checked once there)."""
    rest, n_groups, c = x.shape[1:], len(counts), counts[0]
    if c > 0 and list(counts).count(c) == n_groups:  # equal groups: one broadcast multiply
        return (x.reshape(n_groups, c, *rest) * group_masks.unsqueeze(1)).reshape(x.shape)
    pieces = []
    row, g = 0, 0
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

    The settings are checked as :class:`GyroDropout` checks them (one
    :class:`~gyrodrop.config.GyroDropoutConfig`), whether or not ``training``; ``step``
    is an int ``>= 0``. Rebuilds the active masks on every call; the module caches them.

    Raises:
        ValueError: an argument out of range (named in the message).
        TypeError: ``x`` is not a floating-point tensor.
        RuntimeError: in training, ``x`` is batched by ``torch.func.vmap``.
    """
    owner = "gyro_dropout"
    config = GyroDropoutConfig(
        p=p,
        num_subnets=num_subnets,
        subnets_per_step=subnets_per_step,
        steps_per_set=steps_per_set,
        dims=dims,  # type: ignore[arg-type]  # normalized to a tuple
        schedule=schedule,
        scale=scale,
        owner=owner,
    )
    seed = check_seed(owner, seed)
    schedule_seed = (
        seed if schedule_seed is None else check_seed(owner, schedule_seed, "schedule_seed")
    )
    step = check_int(owner, "step", step, 0)
    if not check_bool(owner, "training", training):
        return x

    def masks_for(x_: Tensor, mshape: tuple[int, ...]) -> tuple[Tensor, list[int]]:
        return _masks_at(config, seed, schedule_seed, step, mshape, x_)

    return _gyro_dropout(owner, x, config, masks_for)


def _masks_at(
    config: GyroDropoutConfig,
    seed: int,
    schedule_seed: int,
    step: int,
    mshape: tuple[int, ...],
    x: Tensor,
) -> tuple[Tensor, list[int]]:
    """The masks of the set active at ``step`` and the rows each gets (no cache)."""
    if config.p == 0.0:
        return x, []  # not used
    sched = SubnetSchedule(
        config.num_subnets, config.subnets_per_step, config.steps_per_set, config.schedule
    )
    active = sched.at_step(schedule_seed, step)
    m = subnet_masks(
        seed, active, mshape, config.p, scale=config.scale, dtype=x.dtype, device=x.device
    )
    start, global_batch = distributed.row_window(x.shape[0])
    counts = distributed.local_group_counts(
        start, x.shape[0], global_batch, config.subnets_per_step
    )
    return m, counts


def _gyro_dropout(
    owner: str,
    x: Tensor,
    config: GyroDropoutConfig,
    masks_for: Callable[[Tensor, tuple[int, ...]], tuple[Tensor, list[int]]],
) -> Tensor:
    """The training computation of gyro dropout, shared by the module and the function:
    ``masks_for(x, mask_shape)`` gives the active set's masks and row counts (the module
    steps and reads its cache there, the function builds them)."""
    if config.unbatched_ndim is not None and x.dim() == config.unbatched_ndim:
        return _gyro_dropout(owner, x.unsqueeze(0), config, masks_for).squeeze(0)
    check_input(owner, x)
    mshape = mask_shape_for(owner, x.shape, config.dims)
    if x.is_meta:
        return x.clone()  # shapes only: no masks, no step
    group_masks, counts = masks_for(x, mshape)
    if config.p == 0.0 or not counts:
        return x
    return _apply_group_masks(x, group_masks, counts)


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
        drop_mode: ``"standard"`` (default: drop all run long), ``"early"`` (drop
            before ``cutoff_step`` only, the identity after: early dropout against
            underfitting) or ``"late"`` (the reverse); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps`` in ``(0, 1)``: ``cutoff_step = round(drop_cutoff *
            total_steps)``.
        cutoff_step: the cutoff as a step (instead of ``drop_cutoff``).
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

    config: GyroDropoutConfig
    config_class = GyroDropoutConfig
    p: float  # these read config (see SteppedModule.config_class)
    scale: Scale
    dims: tuple[int, ...] | None
    unbatched_ndim: int | None

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
        drop_mode: DropMode = "standard",
        drop_cutoff: float | None = None,
        cutoff_step: int | None = None,
        schedule_seed: int | None = None,
        unbatched_ndim: int | None = None,
    ) -> None:
        config = GyroDropoutConfig(
            p=p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
            dims=dims,  # type: ignore[arg-type]  # normalized to a tuple
            schedule=schedule,
            scale=scale,
            unbatched_ndim=unbatched_ndim,
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            cutoff_step=cutoff_step,
            owner=type(self).__name__,
        )
        super().__init__(
            config,
            seed=seed,
            auto_step=auto_step,
            schedule_seed=schedule_seed,
            total_steps=total_steps,
        )

    def active_masks(
        self, x: Tensor, step: int | None = None, mshape: tuple[int, ...] | None = None
    ) -> Tensor:
        """The scaled masks of the set active at ``step`` for inputs shaped like ``x``,
        shape ``(tau, *mask_shape)``; cached until the set changes."""
        step = self._step_arg(step, "active_masks")
        config = self.config
        if mshape is None:
            mshape = mask_shape_for(type(self).__name__, x.shape, config.dims)

        def build(seed: int, active: Tensor) -> Tensor:
            return subnet_masks(
                seed, active, mshape, config.p, scale=config.scale, dtype=x.dtype, device=x.device
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
    def _prepare(self, x: Tensor, mshape: tuple[int, ...]) -> tuple[Tensor, list[int]]:
        step = self._forward_step()  # within a compiler-disabled method
        if self.config.p == 0.0 or not self.config.drops_at(step):
            return x, []  # no group: the identity (p = 0, or early/late dropout's off steps)
        return self.active_masks(x, step, mshape), self.group_counts(x.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        masks_for = self._traced_masks if self.traces_schedule() else self._prepare
        return _gyro_dropout(type(self).__name__, x, self.config, masks_for)

    def _traced_masks(self, x: Tensor, mshape: tuple[int, ...]) -> tuple[Tensor, list[int]]:
        """The compiled training path: the step is a tensor and the active masks are
        computed from it in the graph (the same bits as the cached eager masks)."""
        step = self.forward_step_tensor()
        config = self.config
        if config.p == 0.0:
            return x, []  # not used
        m = subnet_masks(
            self.seed,
            self.active_subnets_tensor(step),
            mshape,
            config.p,
            scale=config.scale,
            dtype=x.dtype,
            device=x.device,
        )
        if config.drop_mode != "standard":  # early/late dropout: masks of 1 off its steps
            m = torch.where(config.drops_at(step), m, torch.ones_like(m))
        return m, self.group_counts(x.shape[0])
