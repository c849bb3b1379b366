"""DropBlock (Ghiasi, Lin, Le, NeurIPS 2018) and gyro DropBlock.

DropBlock zeroes contiguous ``block_size x block_size`` squares of a feature map
instead of independent pixels: neighbouring activations of a conv net are correlated,
so a dropped pixel is recovered from its neighbours, a dropped square is not.

Masks are made without a Python loop over pixels: block *seeds* (top-left corners) are
drawn in the region where a whole block fits, ``(H - bs + 1) x (W - bs + 1)`` (as the
geometric gaps of a Bernoulli process, so the work is proportional to the number of
seeds), then a max-pool of the zero-padded seed map (a dilation by the block, done as
``2 * bs`` shifted ORs) grows every seed into its square. The seed rate is the paper's

    gamma = p / bs**2 * (H * W) / ((H - bs + 1) * (W - bs + 1)),

so the seeded area is ``p`` of the map on average; overlapping squares make the dropped
fraction slightly lower (exactly: :func:`drop_probabilities`). A block larger than the
map is clamped to it.

Scaling (``scale=``):

- ``"inverted"`` (default): a kept pixel is divided by its exact keep probability
  ``(1 - gamma) ** n(i, j)``, where ``n(i, j)`` is the number of block positions that
  cover it, so ``E[output] == input`` pixel by pixel and ``eval()`` needs no rescaling
  (pixels near the border are covered by fewer blocks, dropped less and scaled less).
- ``"realized"``: each mask is scaled by ``numel / kept`` (the paper's count
  normalization), so every mask preserves the sum of a constant input exactly.

Randomness is counter-based (:mod:`gyrodrop.masks`): ``DropBlock2d`` hashes
``(seed, step, global row, channel, position)``, so a data-parallel run draws what one
process with the concatenated batch would, and the ``step``/``seed`` buffers resume the
exact sequence. ``GyroDropBlock2d`` keeps ``num_subnets`` fixed block masks (a pure
function of ``(seed, k)``) and trains them on the gyro schedule: ``subnets_per_step``
contiguous row groups, one mask each, the set kept for ``steps_per_set`` steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gyrodrop import distributed, masks, spatial_masks
from gyrodrop._validation import check_bool, check_choice, check_int, check_p
from gyrodrop.gyro import SCALES, Scale, apply_group_masks
from gyrodrop.schedule import Schedule, SteppedModule, SubnetSchedule, check_input
from gyrodrop.scheduled import ScheduledModule
from gyrodrop.spatial_masks import drop_probabilities, seed_rate

__all__ = [
    "DropBlock2d",
    "GyroDropBlock2d",
    "dropblock2d",
    "gyro_dropblock2d",
    "seed_rate",
    "drop_probabilities",
]

# Hash stream tags of this module (distinct from those in gyrodrop.masks).
_TAG_DROPBLOCK = 0x66
_TAG_GYRO_DROPBLOCK = 0x77


# --------------------------------------------------------------------------------------
# Validation shared by the modules and the functions.


def _check_input(owner: str, x: Tensor, *, training: bool = False) -> None:
    if training:  # a tensor, floating point, not under vmap (its masks depend on rows)
        check_input(owner, x)
    if x.dim() != 4:
        raise ValueError(
            f"{owner}: input must have shape (B, C, H, W), got {tuple(x.shape)}; "
            "hint: DropBlock is for 2-d feature maps, use GyroDropout / nn.Dropout for "
            "(B, F) or (B, T, F) inputs"
        )


# --------------------------------------------------------------------------------------
# Masks (the arithmetic is in gyrodrop.spatial_masks).


def _scaled(drop: Tensor, p: float, block_size: int, scale: Scale, dtype: torch.dtype) -> Tensor:
    return spatial_masks.scaled(drop, p, block_size, scale == "realized", dtype)


def _mask_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def _fresh_masks(
    x: Tensor, p: float, block_size: int, seed: int, step: int, shared: bool, scale: Scale
) -> Tensor:
    """DropBlock2d's masks for ``x`` at ``step``, shape ``(B, C or 1, H, W)``, each row
    keyed by its index in the global batch."""
    b, c, *sizes = x.shape
    cm = 1 if shared else c
    start, _ = distributed.row_window(b)
    streams = torch.arange(start * cm, (start + b) * cm, dtype=torch.int64, device=x.device)
    key = masks.mix_keys(seed, _TAG_DROPBLOCK, step)
    with torch.no_grad():
        drop = spatial_masks.drop_maps(streams, key, p, block_size, sizes)
        return _scaled(drop, p, block_size, scale, _mask_dtype(x)).reshape(b, cm, *sizes)


def subnet_block_masks(
    seed: int,
    subnets: Tensor,
    shape: tuple[int, ...],
    p: float,
    block_size: int,
    *,
    scale: Scale = "inverted",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Scaled block masks of the given gyro subnetworks, shape ``(len(subnets), *shape)``
    with ``shape = (C or 1, H, W)`` or ``(C or 1, D, H, W)``; mask ``k`` is a pure
    function of ``(seed, k)``."""
    cm, *sizes = shape
    subnets = subnets.to(device=device, dtype=torch.int64)
    streams = (subnets[:, None] * cm + torch.arange(cm, device=subnets.device)).reshape(-1)
    key = masks.mix_keys(seed, _TAG_GYRO_DROPBLOCK)
    with torch.no_grad():
        drop = spatial_masks.drop_maps(streams, key, p, block_size, sizes)
        return _scaled(drop, p, block_size, scale, dtype).reshape(len(subnets), cm, *sizes)


# --------------------------------------------------------------------------------------
# Functional forms.


def dropblock2d(
    x: Tensor,
    p: float,
    block_size: int = 7,
    *,
    step: int,
    seed: int = 0,
    shared_channels: bool = False,
    scale: Scale = "inverted",
    training: bool = True,
) -> Tensor:
    """Functional DropBlock: stateless, the step is passed in. See :class:`DropBlock2d`.

    Args:
        x: feature maps, shape ``(B, C, H, W)``.
        p: target dropped fraction in ``[0, 1)`` (the paper's ``1 - keep_prob``).
        block_size: side of the dropped squares (clamped to the map).
        step: the step; the masks are a hash of ``step``, ``seed`` and each row's
            global index.
        seed: the seed of the masks.
        shared_channels: one mask per example for all channels (default: per channel).
        scale: ``"inverted"`` or ``"realized"`` (see the module docstring).
        training: ``False`` returns ``x``.

    Returns:
        ``x`` times the scaled masks: same shape and dtype.
    """
    owner = "dropblock2d"
    p = check_p(owner, p)
    block_size = check_int(owner, "block_size", block_size, 1)
    check_choice(owner, "scale", scale, SCALES)
    _check_input(owner, x, training=training)
    if not training or p == 0.0:
        return x
    if x.is_meta:
        return x.clone()  # shapes only
    return x * _fresh_masks(x, p, block_size, seed, step, shared_channels, scale)


def gyro_dropblock2d(
    x: Tensor,
    p: float,
    block_size: int = 7,
    *,
    step: int,
    seed: int = 0,
    num_subnets: int = 64,
    subnets_per_step: int = 4,
    steps_per_set: int = 1,
    schedule: Schedule = "consecutive",
    shared_channels: bool = False,
    scale: Scale = "inverted",
    training: bool = True,
    schedule_seed: int | None = None,
) -> Tensor:
    """Functional gyro DropBlock: stateless, the step is passed in. See
    :class:`GyroDropBlock2d`. Rebuilds the active masks on every call."""
    owner = "gyro_dropblock2d"
    p = check_p(owner, p)
    block_size = check_int(owner, "block_size", block_size, 1)
    check_choice(owner, "scale", scale, SCALES)
    _check_input(owner, x, training=training)
    if not training or p == 0.0:
        return x
    if x.is_meta:
        return x.clone()  # shapes only
    sched = SubnetSchedule(num_subnets, subnets_per_step, steps_per_set, schedule)
    active = sched.at_step(seed if schedule_seed is None else schedule_seed, step)
    _, c, h, w = x.shape
    m = subnet_block_masks(
        seed,
        active,
        (1 if shared_channels else c, h, w),
        p,
        block_size,
        scale=scale,
        dtype=_mask_dtype(x),
        device=x.device,
    )
    start, global_batch = distributed.row_window(x.shape[0])
    counts = distributed.local_group_counts(start, x.shape[0], global_batch, subnets_per_step)
    return apply_group_masks(x, m, counts)


# --------------------------------------------------------------------------------------
# Modules.


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
    ) -> None:
        owner = type(self).__name__
        p = check_p(owner, p)
        block_size = check_int(owner, "block_size", block_size, 1)
        check_choice(owner, "scale", scale, SCALES)
        check_int(owner, "warmup_steps", warmup_steps, 0)
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        self.p = p
        self.block_size = block_size
        self.shared_channels = check_bool(owner, "shared_channels", shared_channels)
        self.scale = scale
        self.warmup_steps = int(warmup_steps)

    def extra_repr(self) -> str:
        warm = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        return (
            f"p={self.p}, block_size={self.block_size}, "
            f"shared_channels={self.shared_channels}, scale={self.scale}{warm}"
        )

    def rate(self, step: int | None = None) -> float:
        """The drop rate at ``step`` (default: the current step): ``p``, ramped linearly
        from 0 over the first ``warmup_steps`` steps."""
        step = self.current_step() if step is None else step
        if self.warmup_steps and step < self.warmup_steps:
            return self.p * max(step, 0) / self.warmup_steps
        return self.p

    @torch.compiler.disable
    def _masks(self, x: Tensor) -> Tensor | None:
        step = self.forward_step()
        p = self.rate(step)
        if p == 0.0:
            return None
        return _fresh_masks(
            x, p, self.block_size, self.current_seed(), step, self.shared_channels, self.scale
        )

    def hparams(self) -> dict[str, Any]:
        """``p``, ``block_size``, ``shared_channels``, scale and ``warmup_steps``."""
        return {
            "p": self.p,
            "block_size": self.block_size,
            "shared_channels": self.shared_channels,
            "scale": self.scale,
            "warmup_steps": self.warmup_steps,
        }

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, training=self.training)
        if not self.training:
            return x
        if x.is_meta:
            return x.clone()  # shapes only: no masks, no step
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

    Arguments: ``p``, ``block_size``, ``shared_channels`` and ``scale`` as in
    :class:`DropBlock2d`; ``num_subnets``, ``subnets_per_step``, ``total_steps``,
    ``steps_per_set``, ``schedule``, ``seed``, ``auto_step`` and ``schedule_seed`` as in
    :class:`gyrodrop.GyroDropout`.

    Shape: input ``(B, C, H, W)``, output the same. ``eval()``: the identity.
    :func:`gyrodrop.subnet_ensemble_predict` averages over its subnetworks.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.GyroDropBlock2d(0.3, 3, 16, 2, steps_per_set=10)
        >>> y = drop(torch.ones(4, 2, 10, 10))
        >>> bool(torch.equal(y[0], y[1])), bool(torch.equal(y[0], y[2]))  # groups 0-1, 2-3
        (True, False)
    """

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
        schedule_seed: int | None = None,
    ) -> None:
        owner = type(self).__name__
        p = check_p(owner, p)
        block_size = check_int(owner, "block_size", block_size, 1)
        check_choice(owner, "scale", scale, SCALES)
        shared_channels = check_bool(owner, "shared_channels", shared_channels)
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
        self.block_size = block_size
        self.shared_channels = shared_channels
        self.scale = scale

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, block_size={self.block_size}, num_subnets={self.num_subnets}, "
            f"subnets_per_step={self.subnets_per_step}, steps_per_set={self.steps_per_set}, "
            f"schedule={self.schedule}, shared_channels={self.shared_channels}, "
            f"scale={self.scale}"
        )

    def _mask_shape(self, like: Tensor) -> tuple[int, int, int]:
        _check_input(type(self).__name__, like)
        _, c, h, w = like.shape
        return (1 if self.shared_channels else c, h, w)

    def active_masks(self, x: Tensor, step: int | None = None) -> Tensor:
        """The scaled masks of the set active at ``step`` for inputs shaped like ``x``,
        shape ``(tau, C or 1, H, W)``; cached until the set changes."""
        step = self.current_step() if step is None else step
        shape = self._mask_shape(x)

        def build(seed: int, active: Tensor) -> Tensor:
            return subnet_block_masks(
                seed,
                active,
                shape,
                self.p,
                self.block_size,
                scale=self.scale,
                dtype=_mask_dtype(x),
                device=x.device,
            )

        masks_: Tensor = self.for_active_set(step, (shape, x.dtype, x.device), build)
        return masks_

    def subnet_mask(self, k: int, like: Tensor) -> Tensor:
        """The scaled mask of subnetwork ``k`` for inputs shaped like ``like``, shape
        ``(C or 1, H, W)`` (used by :func:`gyrodrop.subnet_ensemble_predict`)."""
        check_int(type(self).__name__, "k", k, 0, self.num_subnets - 1)
        return subnet_block_masks(
            self.current_seed(),
            torch.tensor([k], dtype=torch.int64),
            self._mask_shape(like),
            self.p,
            self.block_size,
            scale=self.scale,
            dtype=_mask_dtype(like),
            device=like.device,
        )[0]

    @torch.compiler.disable
    def _prepare(self, x: Tensor) -> tuple[Tensor, list[int]]:
        group_masks = self.active_masks(x, self.forward_step())
        return group_masks, self.group_counts(x.shape[0])

    def hparams(self) -> dict[str, Any]:
        """Sigma, tau, ``steps_per_set``, schedule, ``p``, ``block_size``,
        ``shared_channels`` and scale."""
        return {
            **super().hparams(),
            "p": self.p,
            "block_size": self.block_size,
            "shared_channels": self.shared_channels,
            "scale": self.scale,
        }

    def forward(self, x: Tensor) -> Tensor:
        _check_input(type(self).__name__, x, training=self.training)
        if not self.training:
            return x
        if x.is_meta:
            return x.clone()  # shapes only: no masks, no step
        if self.p == 0.0:
            self.forward_step()
            return x
        group_masks, counts = self._prepare(x)
        return apply_group_masks(x, group_masks, counts)
