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

import functools
import math
from typing import Any

import torch
from torch import Tensor

from gyrodrop import distributed, masks
from gyrodrop._validation import check_bool, check_choice, check_int, check_p
from gyrodrop.gyro import SCALES, Scale, apply_group_masks
from gyrodrop.schedule import Schedule, SteppedModule, SubnetSchedule, check_input
from gyrodrop.scheduled import ScheduledModule

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
_M32 = 0xFFFFFFFF

#: Hash stream ids: an int64 tensor, or ``(low, high)`` int64 tensors for ids that may
#: reach 2**32 (``id = high * 2**32 + low``, ``low < 2**32``).
Streams = Tensor | tuple[Tensor, Tensor]


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
# Pure mask arithmetic.


def _block_dims(block_size: int, h: int, w: int) -> tuple[int, int]:
    """The block's height and width on an ``h x w`` map (clamped to the map)."""
    return min(block_size, h), min(block_size, w)


def seed_rate(p: float, block_size: int, h: int, w: int) -> float:
    """The paper's gamma for an ``h x w`` map: the probability that a valid position
    (one where a whole block fits) seeds a block. Clamped to ``[0, 1]``.

    Example:
        >>> round(seed_rate(0.1, 3, 8, 8), 6)  # 0.1 / 9 * 64 / 36
        0.019753
    """
    if h <= 0 or w <= 0:
        return 0.0  # an empty map has no block position (and no pixel to drop)
    bh, bw = _block_dims(block_size, h, w)
    gamma = p * (h * w) / (bh * bw * (h - bh + 1) * (w - bw + 1))
    return min(max(gamma, 0.0), 1.0)


def _cover_counts(block_size: int, h: int, w: int) -> Tensor:
    """``n(i, j)``: how many valid block positions cover pixel ``(i, j)``, int64 (h, w)."""
    bh, bw = _block_dims(block_size, h, w)

    def along(n: int, b: int) -> Tensor:
        i = torch.arange(n, dtype=torch.int64)
        return torch.minimum(i, torch.tensor(n - b)) - torch.clamp(i - b + 1, min=0) + 1

    return along(h, bh)[:, None] * along(w, bw)[None, :]


def drop_probabilities(p: float, block_size: int, h: int, w: int) -> Tensor:
    """The exact probability that each pixel of an ``h x w`` map is dropped,
    ``1 - (1 - gamma) ** n(i, j)``, float64, shape ``(h, w)``. Its mean is the expected
    dropped fraction (a little under ``p``: blocks overlap)."""
    gamma = seed_rate(p, block_size, h, w)
    n = _cover_counts(block_size, h, w).to(torch.float64)
    return 1.0 - (1.0 - gamma) ** n


@functools.lru_cache(maxsize=64)
def _inverted_factors(
    p: float, block_size: int, h: int, w: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Per-pixel ``1 / P(keep)``, shape ``(h, w)``; cached (read-only: used in
    ``torch.where`` only), so a step does not rebuild and copy it to the device."""
    keep = 1.0 - drop_probabilities(p, block_size, h, w)
    return (1.0 / keep.clamp_min(1e-12)).to(device=device, dtype=dtype)


def _grow(seeds: Tensor, block_size: int, h: int, w: int) -> Tensor:
    """Seed maps (True at a block's top-left corner), bool ``(N, hv, wv)`` over the valid
    region, to drop maps, bool ``(N, h, w)``: every seed grown into its block.

    This is the max-pool (a dilation) of the zero-padded seed map by the block, done as
    ``bw + bh`` in-place ORs of shifted slices (no padding copy, no float pooling).
    """
    bh, bw = _block_dims(block_size, h, w)
    n, hv, wv = seeds.shape
    rows = torch.zeros(n, hv, w, dtype=torch.bool, device=seeds.device)
    for k in range(bw):  # a loop over the block's width, not over pixels
        rows[:, :, k : k + wv] |= seeds
    out = torch.zeros(n, h, w, dtype=torch.bool, device=seeds.device)
    for k in range(bh):
        out[:, k : k + hv, :] |= rows
    return out


def _stream_bases(streams: Streams, key: int) -> Tensor:
    """32-bit hash bases of the streams, shape ``(m, 1)``. A stream is an int64 id, or
    ``(low, high)`` for ids of 64 bits and more (``id = high * 2**32 + low``): a
    non-zero ``high`` is mixed in (as :mod:`gyrodrop.masks` does for subnetwork ids of
    2**32 and more), so ids below 2**32 keep the bases of 0.1.0."""
    low, high = streams if isinstance(streams, tuple) else (streams, None)
    base = masks.hash_u32((low * 0x2545F491 + key) & _M32)
    if high is not None:
        mixed = base ^ masks.hash_u32((high * 0x27D4EB2F + (key ^ 0x9E3779B9)) & _M32)
        mixed ^= masks.hash_u32(((high >> 32) * 0x165667B1 + key) & _M32)  # high >= 2**32
        base = torch.where(high > 0, mixed, base)
    return base.unsqueeze(1)


def _seed_maps(streams: Streams, key: int, n: int, gamma: float) -> Tensor:
    """Bernoulli(``gamma``) seed maps, bool ``(m, n)`` for ``m`` streams, True at seeds.

    Stream ``s`` (an int64 id, or a ``(low, high)`` pair of them: see
    :func:`_stream_bases`) is a Bernoulli process over ``n`` positions drawn as
    geometric gaps between seeds, gap ``j`` from the hash of ``(key, s, j)``: the work
    is proportional to the number of seeds (about ``gamma * n`` per stream), not to
    ``n``. Every stream is a pure function of ``(key, s)``. The gaps are computed in
    float64, so a CPU and an accelerator agree except, rarely, where their ``log``
    differs in the last bit.
    """
    first = streams[0] if isinstance(streams, tuple) else streams
    m = len(first)
    out = torch.zeros(m, n + 1, dtype=torch.bool, device=first.device)
    if gamma <= 0.0 or m == 0 or n == 0:
        return out[:, :n]
    base = _stream_bases(streams, key)  # (m, 1)
    log_q = math.log1p(-gamma)
    mean = n * gamma
    k = int(mean + 5.0 * math.sqrt(mean) + 8.0)
    while True:
        j = torch.arange(k, dtype=torch.int64, device=first.device)
        u = (masks.hash_grid(base, j).to(torch.float64) + 1.0) * 2.0**-32  # (m, k), (0, 1]
        gaps = torch.floor(torch.log(u) / log_q).clamp_max(2.0 * n) + 1.0
        pos = gaps.to(torch.int64).cumsum(dim=1) - 1  # (m, k) seed positions
        if bool((pos[:, -1] >= n).all()):
            break
        k *= 2  # a stream has more seeds than were drawn; its first gaps stay the same
    out.scatter_(1, pos.clamp_max(n), True)
    return out[:, :n]


def _drop_maps(streams: Streams, key: int, p: float, block_size: int, h: int, w: int) -> Tensor:
    """Drop maps (True dropped), bool ``(m, h, w)``, one per stream."""
    if h == 0 or w == 0:  # an empty map: nothing to drop (as nn.Dropout2d)
        first = streams[0] if isinstance(streams, tuple) else streams
        return torch.zeros(len(first), h, w, dtype=torch.bool, device=first.device)
    bh, bw = _block_dims(block_size, h, w)
    hv, wv = h - bh + 1, w - bw + 1
    seeds = _seed_maps(streams, key, hv * wv, seed_rate(p, block_size, h, w))
    return _grow(seeds.reshape(-1, hv, wv), block_size, h, w)


def _scaled(drop: Tensor, p: float, block_size: int, scale: Scale, dtype: torch.dtype) -> Tensor:
    """Scaled masks ``(N, h, w)`` from drop maps (see the module docstring): 0 where
    dropped, the kept pixels' factor elsewhere."""
    h, w = drop.shape[-2:]
    if scale == "realized":
        kept = (~drop).sum(dim=(-2, -1), keepdim=True).clamp_min(1)
        factor = (h * w / kept.to(torch.float64)).to(dtype)  # (N, 1, 1)
    else:
        factor = _inverted_factors(p, block_size, h, w, dtype, drop.device)  # (h, w)
    return torch.where(drop, torch.zeros((), dtype=dtype, device=drop.device), factor)


def _mask_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def _fresh_masks(
    x: Tensor, p: float, block_size: int, seed: int, step: int, shared: bool, scale: Scale
) -> Tensor:
    """DropBlock2d's masks for ``x`` at ``step``, shape ``(B, C or 1, H, W)``, each row
    keyed by its index in the global batch."""
    b, c, h, w = x.shape
    cm = 1 if shared else c
    start, _ = distributed.row_window(b)
    ids = torch.arange(start * cm, (start + b) * cm, dtype=torch.int64, device=x.device)
    streams = (ids & _M32, ids >> 32)  # ids of 2**32 and more mix their high bits
    key = masks.mix_keys(seed, _TAG_DROPBLOCK, step)
    with torch.no_grad():
        drop = _drop_maps(streams, key, p, block_size, h, w)
        return _scaled(drop, p, block_size, scale, _mask_dtype(x)).reshape(b, cm, h, w)


def subnet_block_masks(
    seed: int,
    subnets: Tensor,
    shape: tuple[int, int, int],
    p: float,
    block_size: int,
    *,
    scale: Scale = "inverted",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Scaled block masks of the given gyro subnetworks, shape ``(len(subnets), *shape)``
    with ``shape = (C or 1, H, W)``; mask ``k`` is a pure function of ``(seed, k)``."""
    cm, h, w = shape
    subnets = subnets.to(device=device, dtype=torch.int64)
    channels = torch.arange(cm, dtype=torch.int64, device=subnets.device)
    # Stream k * cm + c, to 64 bits: low 32 bits (int64 products wrap, low bits exact)
    # and the quotient by 2**32, which _drop_maps mixes in where it is not 0.
    low = (subnets[:, None] & _M32) * cm + channels  # (K, cm), < 2**63 for cm < 2**31
    high = (subnets[:, None] >> 32) * cm + (low >> 32)
    streams = ((low & _M32).reshape(-1), high.reshape(-1))
    key = masks.mix_keys(seed, _TAG_GYRO_DROPBLOCK)
    with torch.no_grad():
        drop = _drop_maps(streams, key, p, block_size, h, w)
        return _scaled(drop, p, block_size, scale, dtype).reshape(len(subnets), cm, h, w)


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
        step = self._step_arg(step, "rate")
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
        step = self._step_arg(step, "active_masks")
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
