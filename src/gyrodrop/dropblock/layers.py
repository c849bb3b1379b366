"""The DropBlock modules: :class:`DropBlock2d` and :class:`GyroDropBlock2d` for
``(B, C, H, W)`` feature maps, :class:`DropBlock3d` and :class:`GyroDropBlock3d` for
``(B, C, D, H, W)`` volumes (the 3-d classes are the 2-d ones with three spatial dims)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from gyrodrop._validation import check_int
from gyrodrop.config import DropBlockConfig, DropMode, GyroDropBlockConfig, Scale, Schedule
from gyrodrop.dropblock.functional import (
    _check_input,
    _dropblock_masks,
    _fresh_masks,
    _gyro_block_masks,
)
from gyrodrop.gyro import _apply_group_masks
from gyrodrop.schedule import SteppedModule
from gyrodrop.scheduled import ScheduledModule
from gyrodrop.stepping import warmup_rate

__all__ = ["DropBlock2d", "GyroDropBlock2d", "DropBlock3d", "GyroDropBlock3d"]


class DropBlock2d(SteppedModule):
    """DropBlock (Ghiasi et al., 2018): zero contiguous ``block_size x block_size``
    squares of each feature map; a fresh draw every step.

    Args:
        p: target dropped fraction, in ``[0, 1)`` (the paper's ``1 - keep_prob``; it
            suggests 0.1 with ``block_size=7`` on ImageNet ResNet-50 stages 3-4).
        block_size: side of the squares, >= 1 (1 is channel-pixel dropout); clamped to
            the map when larger.
        shared_channels: ``False`` (default, the paper's better variant): each channel
            draws its own blocks; ``True``: one mask per example for all channels.
        scale: ``"inverted"`` (per-pixel ``1 / P(keep)``: unbiased) or ``"realized"``
            (``numel / kept`` per mask: the paper's count normalization).
        warmup_steps: ``p`` ramps linearly from 0 at step 0 to ``p`` at this step (the
            paper's linear schedule of ``keep_prob``); 0: no ramp. The scaling follows
            the current rate.
        seed: seeds the masks; a buffer, so it is checkpointed.
        drop_mode: ``"standard"`` (default: drop all run long), ``"early"`` (drop
            before ``cutoff_step`` only, the identity after: early dropout against
            underfitting) or ``"late"`` (the reverse); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps`` in ``(0, 1)``: ``cutoff_step = round(drop_cutoff *
            total_steps)`` (``total_steps`` serves only this).
        cutoff_step: the cutoff as a step (instead of ``drop_cutoff``).
        auto_step: advance the step on each training forward; set ``False`` and call
            :func:`gyrodrop.step` after each optimizer step when one step runs several
            forwards.

    Shape: input ``(B, C, H, W)``, output the same. ``eval()``: the identity.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.DropBlock2d(0.2, block_size=3, seed=1)
        >>> y = drop(torch.ones(2, 4, 12, 12))
        >>> y.shape, bool((y == 0).any())
        (torch.Size([2, 4, 12, 12]), True)
        >>> bool(torch.equal(drop.eval()(torch.ones(2, 4, 12, 12)), torch.ones(2, 4, 12, 12)))
        True
    """

    #: Spatial dims of the input after ``(B, C)``: 2 here, 3 in :class:`DropBlock3d`.
    spatial_dims: ClassVar[int] = 2
    config: DropBlockConfig
    config_class = DropBlockConfig
    p: float  # these read config (see SteppedModule.config_class)
    block_size: int
    shared_channels: bool
    scale: Scale
    warmup_steps: int

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        *,
        shared_channels: bool = False,
        scale: Scale = "inverted",
        warmup_steps: int = 0,
        seed: int = 0,
        auto_step: bool = True,
        drop_mode: DropMode = "standard",
        drop_cutoff: float | None = None,
        cutoff_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        owner = type(self).__name__
        config = DropBlockConfig(
            p=p,
            block_size=block_size,
            shared_channels=shared_channels,
            scale=scale,
            warmup_steps=warmup_steps,
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            cutoff_step=cutoff_step,
            total_steps=total_steps,
            owner=owner,
        )
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        self.config = config

    def rate(self, step: int | None = None) -> float:
        """The drop rate at ``step`` (default: the current step): ``p``, ramped linearly
        from 0 over the first ``warmup_steps`` steps; 0 at the steps where ``drop_mode``
        does not drop (after the cutoff when early, before it when late)."""
        step = self._step_arg(step, "rate")
        config = self.config
        return warmup_rate(config.p, config.warmup_steps, step) if config.drops_at(step) else 0.0

    @torch.compiler.disable
    def _masks(self, x: Tensor) -> Tensor | None:
        step = self._forward_step()  # within a compiler-disabled method
        return _dropblock_masks(x, self.config, self.current_seed(), step)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, training=self.training, spatial=self.spatial_dims)
        if not self.training:
            return x
        if x.is_meta:
            return x.clone()  # shapes only: no masks, no step
        config = self.config
        if torch.compiler.is_compiling() and not config.warmup_steps:
            # traced: the step is a tensor, the masks are drawn from it in the graph
            # (a warm-up ramps gamma per step: that path stays eager, a graph break)
            step = self.forward_step_tensor()
            if config.p == 0.0:
                return x
            shared = config.shared_channels
            m = _fresh_masks(x, config.p, config.block_size, self.seed, step, shared, config.scale)
            y = x * m
            return y if config.drop_mode == "standard" else torch.where(config.drops_at(step), y, x)
        m = self._masks(x)
        return x if m is None else x * m


class GyroDropBlock2d(ScheduledModule):
    """Gyro DropBlock: ``num_subnets`` (sigma) fixed DropBlock masks trained on the
    gyro-dropout schedule instead of a fresh draw every step.

    Mask ``k`` is a DropBlock mask (as in :class:`DropBlock2d`) that is a pure function
    of ``(seed, k)`` and the map's shape. Each step the batch is split into
    ``subnets_per_step`` (tau) contiguous row groups, one active mask each; a set of
    tau masks stays active for ``steps_per_set`` consecutive steps, then the next
    (consecutive scheduling, every mask once per cycle) or a fresh random set each step
    (``schedule="random"``). The tau active masks are cached until the set changes.

    Arguments: ``p``, ``block_size``, ``shared_channels``, ``scale``, ``drop_mode``,
    ``drop_cutoff`` and ``cutoff_step`` as in :class:`DropBlock2d`; ``num_subnets``,
    ``subnets_per_step``, ``total_steps``, ``steps_per_set``, ``schedule``, ``seed``,
    ``auto_step`` and ``schedule_seed`` as in :class:`gyrodrop.GyroDropout`.

    Shape: input ``(B, C, H, W)``, output the same. ``eval()``: the identity.
    :func:`gyrodrop.subnet_ensemble_predict` averages over its subnetworks.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.GyroDropBlock2d(0.3, 3, 16, 2, steps_per_set=10)
        >>> y = drop(torch.ones(4, 2, 10, 10))
        >>> bool(torch.equal(y[0], y[1])), bool(torch.equal(y[0], y[2]))  # groups 0-1, 2-3
        (True, False)
    """

    #: Spatial dims of the input after ``(B, C)``: 2 here, 3 in :class:`GyroDropBlock3d`.
    spatial_dims: ClassVar[int] = 2
    config: GyroDropBlockConfig
    config_class = GyroDropBlockConfig
    p: float  # these read config (see SteppedModule.config_class)
    block_size: int
    shared_channels: bool
    scale: Scale

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        num_subnets: int = 64,
        subnets_per_step: int = 4,
        *,
        total_steps: int | None = None,
        steps_per_set: int | None = None,
        schedule: Schedule = "consecutive",
        shared_channels: bool = False,
        scale: Scale = "inverted",
        seed: int = 0,
        auto_step: bool = True,
        drop_mode: DropMode = "standard",
        drop_cutoff: float | None = None,
        cutoff_step: int | None = None,
        schedule_seed: int | None = None,
    ) -> None:
        config = GyroDropBlockConfig(
            p=p,
            block_size=block_size,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
            schedule=schedule,
            shared_channels=shared_channels,
            scale=scale,
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

    def _mask_shape(self, like: Tensor) -> tuple[int, ...]:
        _check_input(type(self).__name__, like, spatial=self.spatial_dims)
        _, c, *sizes = like.shape
        return (1 if self.config.shared_channels else c, *sizes)

    def active_masks(self, x: Tensor, step: int | None = None) -> Tensor:
        """The scaled masks of the set active at ``step`` for inputs shaped like ``x``,
        shape ``(tau, C or 1, H, W)`` (``(tau, C or 1, D, H, W)`` in 3-d); cached until
        the set changes."""
        step = self._step_arg(step, "active_masks")
        shape = self._mask_shape(x)
        config = self.config
        masks_: Tensor = self.for_active_set(
            step,
            (shape, x.dtype, x.device),
            lambda seed, active: _gyro_block_masks(x, config, seed, active),
        )
        return masks_

    def subnet_mask(self, k: int, like: Tensor) -> Tensor:
        """The scaled mask of subnetwork ``k`` for inputs shaped like ``like``, shape
        ``(C or 1, H, W)``, or ``(C or 1, D, H, W)`` in 3-d (used by
        :func:`gyrodrop.subnet_ensemble_predict`)."""
        check_int(type(self).__name__, "k", k, 0, self.num_subnets - 1)
        self._mask_shape(like)
        ids = torch.tensor([k], dtype=torch.int64)
        return _gyro_block_masks(like, self.config, self.current_seed(), ids)[0]

    @torch.compiler.disable
    def _prepare(self, x: Tensor) -> tuple[Tensor, list[int]] | None:
        step = self._forward_step()  # within a compiler-disabled method
        if not self.config.drops_at(step):
            return None  # early/late dropout: not this step
        return self.active_masks(x, step), self.group_counts(x.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, training=self.training, spatial=self.spatial_dims)
        if not self.training:
            return x
        if x.is_meta:
            return x.clone()  # shapes only: no masks, no step
        if self.traces_schedule():
            # traced: the active masks are computed from the step tensor in the graph
            step = self.forward_step_tensor()
            config = self.config
            if config.p == 0.0:
                return x
            active = self.active_subnets_tensor(step)
            group_masks = _gyro_block_masks(x, config, self.seed, active)
            y = _apply_group_masks(x, group_masks, self.group_counts(x.shape[0]))
            return y if config.drop_mode == "standard" else torch.where(config.drops_at(step), y, x)
        if self.config.p == 0.0:
            self.forward_step()
            return x
        prepared = self._prepare(x)
        return x if prepared is None else _apply_group_masks(x, *prepared)


class DropBlock3d(DropBlock2d):
    """3-d DropBlock: :class:`DropBlock2d` for volumes ``(B, C, D, H, W)`` (video
    clips, 3-d scans), zeroing ``block_size`` cubes; a fresh draw every step.

    The same options, guarantees and scaling as :class:`DropBlock2d` (seeded,
    resumable, DDP rows keyed by the global batch, checkpoint replay); the seed rate is
    the paper's gamma over three dims (:func:`gyrodrop.spatial_masks.seed_rate`), and a
    volume of depth 1 gets the masks :class:`DropBlock2d` gives its ``H x W`` map. A
    subclass of :class:`DropBlock2d`, as in torchvision.

    Shape: input ``(B, C, D, H, W)``, output the same. ``eval()``: the identity.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.DropBlock3d(0.2, block_size=3, seed=1)
        >>> y = drop(torch.ones(2, 4, 6, 12, 12))
        >>> y.shape, bool((y == 0).any())
        (torch.Size([2, 4, 6, 12, 12]), True)
    """

    spatial_dims: ClassVar[int] = 3


class GyroDropBlock3d(GyroDropBlock2d):
    """3-d gyro DropBlock: :class:`GyroDropBlock2d` for volumes ``(B, C, D, H, W)``:
    ``num_subnets`` fixed 3-d DropBlock masks (cubes of ``block_size``), each a pure
    function of ``(seed, k)`` and the volume's shape, trained on the gyro schedule.
    The same options and guarantees as :class:`GyroDropBlock2d`.

    Shape: input ``(B, C, D, H, W)``, output the same. ``eval()``: the identity.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.GyroDropBlock3d(0.3, 3, 16, 2, steps_per_set=10)
        >>> y = drop(torch.ones(4, 2, 5, 10, 10))
        >>> bool(torch.equal(y[0], y[1])), bool(torch.equal(y[0], y[2]))  # groups 0-1, 2-3
        (True, False)
    """

    spatial_dims: ClassVar[int] = 3
