"""DropBlock's masks over 2-d and 3-d maps: pure functions of integers (the masks
layer).

A mask drops blocks of ``block_size`` along every spatial dim (squares of an
``H x W`` map, cubes of a ``D x H x W`` volume). Block *seeds* (the blocks' first
corners) are drawn in the region where a whole block fits, ``prod(n - b + 1)``
positions for a map of sizes ``n`` and block sides ``b = min(block_size, n)`` (as the
geometric gaps of a Bernoulli process, so the work is proportional to the number of
seeds), then every seed grows into its block by a dilation done as ``sum(b)`` shifted
in-place ORs. The seed rate is Ghiasi et al.'s, generalized over the dims:

    gamma = p / prod(b) * prod(n) / prod(n - b + 1),

so the seeded volume is ``p`` of the map on average; overlapping blocks make the dropped
fraction slightly lower (exactly: :func:`drop_probabilities`). A block larger than the
map is clamped to it. A 3-d volume of depth 1 gets the mask of its 2-d map.

Scaling: ``"inverted"`` divides a kept position by its exact keep probability
``(1 - gamma) ** n(pos)`` (``n(pos)``: the number of block positions covering it), so
``E[output] == input`` position by position; ``"realized"`` scales each mask by
``numel / kept``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gyrodrop import masks

_M32 = 0xFFFFFFFF

#: Hash stream ids: an int64 tensor, or ``(low, high)`` int64 tensors for ids that may
#: reach 2**32 (``id = high * 2**32 + low``, ``low < 2**32``).
Streams = Tensor | tuple[Tensor, Tensor]

__all__ = [
    "Streams",
    "seed_rate",
    "drop_probabilities",
    "cover_counts",
    "inverted_factors",
    "stream_bases",
    "seed_maps",
    "grow",
    "drop_maps",
    "scaled",
]


def block_dims(block_size: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """The block's side along each dim of a map of ``sizes`` (clamped to the map)."""
    return tuple([min(block_size, n) for n in sizes])  # lists: torch.compile traces them


def seed_rate(p: float, block_size: int, *sizes: int) -> float:
    """The paper's gamma for a map of ``sizes`` (``h, w`` or ``d, h, w``): the
    probability that a valid position (one where a whole block fits) seeds a block.
    Clamped to ``[0, 1]``.

    Example:
        >>> round(seed_rate(0.1, 3, 8, 8), 6)  # 0.1 / 9 * 64 / 36
        0.019753
    """
    if min(sizes) <= 0:
        return 0.0  # an empty map has no block position (and no position to drop)
    b = block_dims(block_size, sizes)
    valid = math.prod([n - k + 1 for n, k in zip(sizes, b, strict=True)])  # a list: traceable
    gamma = p * math.prod(sizes) / (math.prod(b) * valid)
    return min(max(gamma, 0.0), 1.0)


def cover_counts(block_size: int, *sizes: int) -> Tensor:
    """``n(pos)``: how many valid block positions cover each position, int64 ``sizes``."""
    b = block_dims(block_size, sizes)
    out = torch.ones((1,) * len(sizes), dtype=torch.int64)
    for d, (n, k) in enumerate(zip(sizes, b, strict=True)):
        i = torch.arange(n, dtype=torch.int64)
        along = torch.minimum(i, torch.tensor(n - k)) - torch.clamp(i - k + 1, min=0) + 1
        shape = [1] * len(sizes)
        shape[d] = n
        out = out * along.reshape(shape)
    return out


def drop_probabilities(p: float, block_size: int, *sizes: int) -> Tensor:
    """The exact probability that each position of a map of ``sizes`` is dropped,
    ``1 - (1 - gamma) ** n(pos)``, float64, shape ``sizes``. Its mean is the expected
    dropped fraction (a little under ``p``: blocks overlap)."""
    gamma = seed_rate(p, block_size, *sizes)
    n = cover_counts(block_size, *sizes).to(torch.float64)
    return 1.0 - (1.0 - gamma) ** n


@functools.lru_cache(maxsize=64)
def inverted_factors(
    p: float, block_size: int, sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Per-position ``1 / P(keep)``, shape ``sizes``; cached (read-only: used in
    ``torch.where`` only), so a step does not rebuild and copy it to the device."""
    keep = 1.0 - drop_probabilities(p, block_size, *sizes)
    return (1.0 / keep.clamp_min(1e-12)).to(device=device, dtype=dtype)


def grow(seeds: Tensor, block_size: int, sizes: Sequence[int]) -> Tensor:
    """Seed maps (True at a block's first corner), bool ``(N, *valid)`` over the valid
    region, to drop maps, bool ``(N, *sizes)``: every seed grown into its block.

    The max-pool (a dilation) of the zero-padded seed map by the block, done dim by dim
    (last first) as ``b`` in-place ORs of shifted slices per dim: a loop over the
    block's sides, not over positions; no padding copy, no float pooling.
    """
    b = block_dims(block_size, sizes)
    # uint8 under torch.compile: inductor's CPU code generator fails on these bool ORs
    dtype = torch.uint8 if torch.compiler.is_compiling() else torch.bool
    out = seeds.to(dtype)
    for d in reversed(range(len(sizes))):
        axis = d + 1
        valid = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = sizes[d]
        grown = torch.zeros(shape, dtype=dtype, device=seeds.device)
        for k in range(b[d]):
            grown.narrow(axis, k, valid).bitwise_or_(out)
        out = grown
    return out.bool()


def stream_bases(streams: Streams, key: int | Tensor) -> Tensor:
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


def seed_maps(streams: Streams, key: int | Tensor, n: int, gamma: float) -> Tensor:
    """Bernoulli(``gamma``) seed maps, bool ``(m, n)`` for ``m`` streams, True at seeds.

    Stream ``s`` (an int64 id, or a ``(low, high)`` pair of them: see
    :func:`stream_bases`) is a Bernoulli process over ``n`` positions drawn as
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
    if isinstance(key, Tensor):  # the compiled path: a key mixed from the step tensor
        key = key.to(first.device)
    base = stream_bases(streams, key)  # (m, 1)
    log_q = math.log1p(-gamma)
    mean = n * gamma
    k = int(mean + 5.0 * math.sqrt(mean) + 8.0)
    if torch.compiler.is_compiling():
        return _traced_seed_maps(base, k, n, log_q)
    while True:
        pos = _seed_positions(base, k, n, log_q)
        if bool((pos[:, -1] >= n).all()):
            break
        k *= 2  # a stream has more seeds than were drawn; its first gaps stay the same
    out.scatter_(1, pos.clamp_max(n), True)
    return out[:, :n]


def _seed_positions(base: Tensor, k: int, n: int, log_q: float) -> Tensor:
    """The first ``k`` seed positions of each stream, int64 ``(m, k)`` (cumulated
    geometric gaps; positions ``>= n`` lie past the map)."""
    j = torch.arange(k, dtype=torch.int64, device=base.device)
    u = (masks.hash_grid(base, j).to(torch.float64) + 1.0) * 2.0**-32  # (m, k), (0, 1]
    gaps = torch.floor(torch.log(u) / log_q).clamp_max(2.0 * n) + 1.0
    return gaps.to(torch.int64).cumsum(dim=1) - 1


def _scatter_seeds(pos: Tensor, n: int) -> Tensor:
    out = torch.zeros(pos.shape[0], n + 1, dtype=torch.bool, device=pos.device)
    return out.scatter(1, pos.clamp_max(n), True)[:, :n].contiguous()


def _traced_seed_maps(base: Tensor, k: int, n: int, log_q: float) -> Tensor:
    """:func:`seed_maps` under ``torch.compile``: static shapes instead of the doubling
    loop, ``n + 1`` gaps (enough for any stream: every gap is at least 1). The same
    first gaps, so the same maps, at O(n) work per stream instead of O(gamma n) (a
    ``torch.cond`` on the eager first guess ``k`` fails with dynamic shapes)."""
    del k
    return _scatter_seeds(_seed_positions(base, n + 1, n, log_q), n)


def drop_maps(
    streams: Streams, key: int | Tensor, p: float, block_size: int, sizes: Sequence[int]
) -> Tensor:
    """Drop maps (True dropped), bool ``(m, *sizes)``, one per stream."""
    if min(sizes) == 0:  # an empty map: nothing to drop (as nn.Dropout2d)
        first = streams[0] if isinstance(streams, tuple) else streams
        return torch.zeros(len(first), *sizes, dtype=torch.bool, device=first.device)
    b = block_dims(block_size, sizes)
    valid = [n - k + 1 for n, k in zip(sizes, b, strict=True)]
    gamma = seed_rate(p, block_size, *sizes)
    seeds = seed_maps(streams, key, math.prod(valid), gamma)
    return grow(seeds.reshape(-1, *valid), block_size, sizes)


def scaled(drop: Tensor, p: float, block_size: int, realized: bool, dtype: torch.dtype) -> Tensor:
    """Scaled masks ``(N, *sizes)`` from drop maps ``(N, *sizes)``: 0 where dropped, the
    kept positions' factor elsewhere (``numel / kept`` per mask when ``realized``, else
    the per-position ``1 / P(keep)``)."""
    sizes = tuple(drop.shape[1:])
    if realized:
        dims = tuple(range(1, drop.dim()))
        kept = (~drop).sum(dim=dims, keepdim=True).clamp_min(1)
        factor = (math.prod(sizes) / kept.to(torch.float64)).to(dtype)  # (N, 1, ...)
    else:
        factor = inverted_factors(p, block_size, sizes, dtype, drop.device)
    return torch.where(drop, torch.zeros((), dtype=dtype, device=drop.device), factor)
