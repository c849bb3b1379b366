"""DropBlock's functional forms and mask builders for 2-d maps and 3-d volumes:
stateless, the step is passed in (:func:`dropblock2d`, :func:`dropblock3d`,
:func:`gyro_dropblock2d`, :func:`gyro_dropblock3d`). The modules in
:mod:`gyrodrop.dropblock.layers` build their masks here; the mask arithmetic is in
:mod:`gyrodrop.spatial_masks`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gyrodrop import distributed, masks, spatial_masks
from gyrodrop._validation import check_bool, check_int, check_seed
from gyrodrop.config import DropBlockConfig, GyroDropBlockConfig, Scale, Schedule
from gyrodrop.gyro import _apply_group_masks
from gyrodrop.schedule import SubnetSchedule, check_input
from gyrodrop.stepping import warmup_rate

__all__ = [
    "dropblock2d",
    "dropblock3d",
    "gyro_dropblock2d",
    "gyro_dropblock3d",
    "subnet_block_masks",
]

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Validation shared by the modules and the functions.


def _check_call(owner: str, seed: Any, step: Any, training: Any) -> None:
    """What a functional form checks besides its config (as its module does)."""
    check_seed(owner, seed)
    check_int(owner, "step", step, 0)
    check_bool(owner, "training", training)


def _check_input(owner: str, x: Tensor, *, training: bool = False, spatial: int = 2) -> None:
    if training:  # a tensor, floating point, not under vmap (its masks depend on rows)
        check_input(owner, x)
    if x.dim() != 2 + spatial:
        if spatial == 2:
            want, hint = "(B, C, H, W)", "DropBlock2d is for 2-d feature maps, DropBlock3d for "
            hint += "(B, C, D, H, W) volumes"
        else:
            want, hint = "(B, C, D, H, W)", "DropBlock3d is for 3-d volumes, DropBlock2d for "
            hint += "(B, C, H, W) feature maps"
        raise ValueError(
            f"{owner}: input must have shape {want}, got {tuple(x.shape)}; hint: {hint}; "
            "use GyroDropout / nn.Dropout for (B, F) or (B, T, F) inputs"
        )


# --------------------------------------------------------------------------------------
# Masks (the arithmetic is in gyrodrop.spatial_masks).


def _scaled(drop: Tensor, p: float, block_size: int, scale: Scale, dtype: torch.dtype) -> Tensor:
    return spatial_masks.scaled(drop, p, block_size, scale == "realized", dtype)


def _mask_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def _fresh_masks(
    x: Tensor,
    p: float,
    block_size: int,
    seed: int | Tensor,
    step: int | Tensor,
    shared: bool,
    scale: Scale,
) -> Tensor:
    """DropBlock2d's masks for ``x`` at ``step``, shape ``(B, C or 1, H, W)``, each row
    keyed by its index in the global batch."""
    b, c, *sizes = x.shape
    cm = 1 if shared else c
    start, _ = distributed.row_window(b)
    ids = torch.arange(start * cm, (start + b) * cm, dtype=torch.int64, device=x.device)
    streams = (ids & _M32, ids >> 32)  # ids of 2**32 and more mix their high bits
    key: int | Tensor
    if isinstance(seed, Tensor) or isinstance(step, Tensor):  # the compiled path
        key = masks.mix_keys_tensor(seed, masks.TAG_DROPBLOCK, step)
    else:
        key = masks.mix_keys(seed, masks.TAG_DROPBLOCK, step)
    with torch.no_grad():
        drop = spatial_masks.drop_maps(streams, key, p, block_size, sizes)
        return _scaled(drop, p, block_size, scale, _mask_dtype(x)).reshape(b, cm, *sizes)


def subnet_block_masks(
    seed: int | Tensor,
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
    channels = torch.arange(cm, dtype=torch.int64, device=subnets.device)
    # Stream k * cm + c, to 64 bits: low 32 bits (int64 products wrap, low bits exact)
    # and the quotient by 2**32, which drop_maps mixes in where it is not 0.
    low = (subnets[:, None] & _M32) * cm + channels  # (K, cm), < 2**63 for cm < 2**31
    high = (subnets[:, None] >> 32) * cm + (low >> 32)
    streams = ((low & _M32).reshape(-1), high.reshape(-1))
    key: int | Tensor
    if isinstance(seed, Tensor):  # the compiled path
        key = masks.mix_keys_tensor(seed, masks.TAG_GYRO_DROPBLOCK)
    else:
        key = masks.mix_keys(seed, masks.TAG_GYRO_DROPBLOCK)
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
        step: the step, an int ``>= 0``; the masks are a hash of ``step``, ``seed`` and
            each row's global index.
        seed: the seed of the masks.
        shared_channels: one mask per example for all channels (default: per channel).
        scale: ``"inverted"`` or ``"realized"`` (see the module docstring).
        training: ``False`` returns ``x``.

    Returns:
        ``x`` times the scaled masks: same shape and dtype.

    Raises:
        ValueError: what :class:`DropBlock2d` refuses (one
            :class:`~gyrodrop.config.DropBlockConfig`), a bad ``seed``, ``step`` or
            ``training``, or an input that is not ``(B, C, H, W)``.
        TypeError: in training, an integer or bool input.
    """
    return _dropblock(
        "dropblock2d", 2, x, p, block_size, step, seed, shared_channels, scale, training
    )


def dropblock3d(
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
    """Functional 3-d DropBlock: :func:`dropblock2d` for volumes ``(B, C, D, H, W)``,
    dropping ``block_size`` cubes. See :class:`~gyrodrop.DropBlock3d`."""
    return _dropblock(
        "dropblock3d", 3, x, p, block_size, step, seed, shared_channels, scale, training
    )


def _dropblock(
    owner: str,
    spatial: int,
    x: Tensor,
    p: float,
    block_size: int,
    step: int,
    seed: int,
    shared_channels: bool,
    scale: Scale,
    training: bool,
) -> Tensor:
    config = DropBlockConfig(
        p=p, block_size=block_size, shared_channels=shared_channels, scale=scale, owner=owner
    )
    _check_call(owner, seed, step, training)
    _check_input(owner, x, training=training, spatial=spatial)
    if not training or x.is_meta:
        return x if not training else x.clone()
    m = _dropblock_masks(x, config, seed, step)
    return x if m is None else x * m


def _dropblock_masks(x: Tensor, config: DropBlockConfig, seed: int, step: int) -> Tensor | None:
    """DropBlock2d's masks for ``x`` at ``step`` (``None``: the rate is 0), shared by the
    module and the function."""
    p = warmup_rate(config.p, config.warmup_steps, step) if config.drops_at(step) else 0.0
    if p == 0.0:
        return None
    return _fresh_masks(x, p, config.block_size, seed, step, config.shared_channels, config.scale)


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
    :class:`GyroDropBlock2d` (the same checks, one
    :class:`~gyrodrop.config.GyroDropBlockConfig`). Rebuilds the active masks on every
    call."""
    return _gyro_dropblock(
        "gyro_dropblock2d", 2, x, p, block_size, step, seed, num_subnets, subnets_per_step,
        steps_per_set, schedule, shared_channels, scale, training, schedule_seed,
    )  # fmt: skip


def gyro_dropblock3d(
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
    """Functional 3-d gyro DropBlock: :func:`gyro_dropblock2d` for volumes
    ``(B, C, D, H, W)``. See :class:`~gyrodrop.GyroDropBlock3d`."""
    return _gyro_dropblock(
        "gyro_dropblock3d", 3, x, p, block_size, step, seed, num_subnets, subnets_per_step,
        steps_per_set, schedule, shared_channels, scale, training, schedule_seed,
    )  # fmt: skip


def _gyro_dropblock(
    owner: str,
    spatial: int,
    x: Tensor,
    p: float,
    block_size: int,
    step: int,
    seed: int,
    num_subnets: int,
    subnets_per_step: int,
    steps_per_set: int,
    schedule: Schedule,
    shared_channels: bool,
    scale: Scale,
    training: bool,
    schedule_seed: int | None,
) -> Tensor:
    config = GyroDropBlockConfig(
        p=p,
        block_size=block_size,
        num_subnets=num_subnets,
        subnets_per_step=subnets_per_step,
        steps_per_set=steps_per_set,
        schedule=schedule,
        shared_channels=shared_channels,
        scale=scale,
        owner=owner,
    )
    _check_call(owner, seed, step, training)
    schedule_seed = (
        seed if schedule_seed is None else check_seed(owner, schedule_seed, "schedule_seed")
    )
    _check_input(owner, x, training=training, spatial=spatial)
    if not training or x.is_meta:
        return x if not training else x.clone()
    if config.p == 0.0:
        return x
    sched = SubnetSchedule(num_subnets, subnets_per_step, steps_per_set, schedule)
    m = _gyro_block_masks(x, config, seed, sched.at_step(schedule_seed, step))
    start, global_batch = distributed.row_window(x.shape[0])
    counts = distributed.local_group_counts(start, x.shape[0], global_batch, subnets_per_step)
    return _apply_group_masks(x, m, counts)


def _gyro_block_masks(
    x: Tensor, config: GyroDropBlockConfig, seed: int | Tensor, active: Tensor
) -> Tensor:
    """The scaled masks of the subnetworks ``active`` for inputs shaped like ``x``,
    shape ``(len(active), C or 1, *spatial)``: shared by the module and the function."""
    _, c, *sizes = x.shape
    return subnet_block_masks(
        seed,
        active,
        (1 if config.shared_channels else c, *sizes),
        config.p,
        config.block_size,
        scale=config.scale,
        dtype=_mask_dtype(x),
        device=x.device,
    )
