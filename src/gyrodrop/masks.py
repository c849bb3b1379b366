"""Seeded, counter-based subnetwork masks.

A subnetwork is a keep/drop pattern over a layer's neurons. gyrodrop never stores the
``num_subnets`` patterns: mask ``k`` is a pure function of ``(seed, k)`` computed by an
integer hash, so any mask can be rebuilt on any device, on any rank, at any step, and
gives the same bits on the CPU and on an accelerator. Only the masks of the active set
are ever held in memory.

The hash is a 32-bit integer mixer evaluated with int64 tensor arithmetic (products are
reduced modulo 2**32, so wrap-around in int64 does not change the result).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hash_u32",
    "mix_keys",
    "mix_keys_tensor",
    "drop_threshold_tensor",
    "layer_seed",
    "seeded_permutation",
    "feistel_permutation",
    "SORTED_PERMUTATION_MAX",
    "seeded_draws",
    "element_keep_mask",
    "block_keep_mask",
    "block_bounds",
    "hash_grid",
    "drop_threshold",
    "STREAM_TAGS",
]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# Stream tags: the first key mixed after the seed, keeping the hash inputs of different
# uses apart. Every tag of the package is here (one table). The values are pinned by
# the golden mask bits (tests/test_golden.py): 0x66 serves three uses whose other keys
# differ, kept so that no mask changes; a new use takes a value not in the table.
TAG_ELEMENT = 0x11  # element masks of gyro dropout
TAG_BLOCK = 0x22  # block masks of block-wise gyro dropout
TAG_PERM = 0x33  # the consecutive schedule's shuffles
TAG_RANDOM_SET = 0x44  # the random schedule's sets
TAG_DEPTH = 0x55  # stochastic depth (sub-streams in gyrodrop.stochastic_depth.module)
TAG_REPLACE_SET = 0x66  # the replacement schedule's draws
TAG_DROPBLOCK = 0x66  # DropBlock2d's seed maps, keyed by (seed, tag, step)
TAG_MC_MEMBERS = 0x66  # which subnetworks each Monte-Carlo pass uses (uncertainty)
TAG_SUBSET = 0x67  # the seeded subset of subnetworks of an ensemble (uncertainty)
TAG_GYRO_DROPBLOCK = 0x77  # gyro DropBlock's per-subnetwork seed maps
TAG_LAYER = 0xD5  # per-layer seeds of the surgery functions (layer_seed)
#: Every stream tag by name: the one table (a new tag gets a new value here).
STREAM_TAGS: dict[str, int] = {
    name: value for name, value in globals().items() if name.startswith("TAG_")
}


def hash_u32(x: Tensor) -> Tensor:
    """Mix a tensor of integers in ``[0, 2**32)`` into well spread 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix_int(h: int, key: int) -> int:
    """Python-int twin of one :func:`mix_keys` round, for scalar keys."""
    x = (h ^ (key & _M32) ^ ((key >> 32) & _M32)) + _GOLDEN
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix_tensor(h: Tensor | int, key: Tensor | int) -> Tensor:
    """Tensor twin of :func:`_mix_int` (int64 tensors, any shape): the same bits."""
    x = ((h ^ (key & _M32) ^ ((key >> 32) & _M32)) + _GOLDEN) & _M32
    return hash_u32(torch.as_tensor(x, dtype=torch.int64))


def mix_keys(*keys: int) -> int:
    """Fold non-negative Python ints (seed, tag, counters) into one 32-bit key."""
    h = 0
    for key in keys:
        h = _mix_int(h, int(key))
    return h


def mix_keys_tensor(*keys: Tensor | int) -> Tensor:
    """:func:`mix_keys` of keys some of which are int64 tensors (a step or seed buffer,
    any shape; they broadcast): the same 32-bit values as int64 tensors, computed with
    tensor ops only, so ``torch.compile`` traces it with the step as a tensor (no
    recompile per step). Python ints among the keys are folded on the host."""
    h: Tensor | int = 0
    for key in keys:
        if isinstance(key, Tensor) or isinstance(h, Tensor):
            h = _mix_tensor(h, key)
        else:
            h = _mix_int(h, int(key))
    return torch.as_tensor(h, dtype=torch.int64)


def _key(*keys: Tensor | int) -> Tensor | int:
    """:func:`mix_keys` when every key is an int, :func:`mix_keys_tensor` otherwise."""
    if any(isinstance(k, Tensor) for k in keys):
        return mix_keys_tensor(*keys)
    return mix_keys(*keys)  # type: ignore[arg-type]


def layer_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th layer a surgery function builds from the user's
    ``seed``: distinct per layer, fixed by ``seed`` (a 62-bit int, so it fits the
    int64 ``seed`` buffer)."""
    return (mix_keys(seed, TAG_LAYER, index) << 31) | (index & 0x7FFFFFFF)


def drop_threshold(p: float) -> int:
    """32-bit hash values below this are drops: P(drop) = p (to 2**-32)."""
    return min(int(round(p * 2**32)), 2**32)


def drop_threshold_tensor(p: Tensor) -> Tensor:
    """:func:`drop_threshold` of a float64 tensor rate (a warm-up ramp computed from the
    step tensor): the same values (round half to even, as Python's ``round``), int64."""
    return torch.round(p.to(torch.float64) * 2**32).to(torch.int64).clamp_max(2**32)


def hash_grid(base: Tensor | int, index: Tensor) -> Tensor:
    """Two hash rounds of ``base`` (an int, or a tensor of shape (K, 1)) with element
    indices (shape (N,)): well spread 32-bit values, shape (K, N) or (N,)."""
    h = hash_u32((base ^ index) & _M32)
    return hash_u32((h + _GOLDEN) & _M32 ^ base)


def _subnet_bases(seed: int | Tensor, tag: int, subnets: Tensor) -> Tensor:
    """Per-subnetwork 32-bit hash bases, shape (K, 1), from (seed, tag, k)."""
    key = _key(seed, tag)
    subnets = subnets.to(torch.int64)
    base = hash_u32((subnets * 0x2545F491 + key) & _M32)
    # Ids of 2**32 and more (sigma up to 2**62) also mix their high bits; ids below
    # 2**32 keep the bases of 0.1.0.
    high = subnets >> 32
    mixed = base ^ hash_u32((high * 0x27D4EB2F + (key ^ _GOLDEN)) & _M32)
    return torch.where(high > 0, mixed, base).unsqueeze(1)


def seeded_permutation(
    seed: int | Tensor,
    tag: int,
    counter: int | Tensor,
    n: int,
    device: torch.device | None = None,
) -> Tensor:
    """A permutation of ``range(n)`` that depends only on ``(seed, tag, counter)``.

    Sorted by hash with the index as a tie-break, so it is identical everywhere.
    Returned as int64 on ``device`` (default: the CPU). ``seed`` and ``counter`` may be
    int64 tensors: shape ``counter.shape + (n,)``, one permutation per counter, the same
    values (what the compiled training path uses).
    """
    idx = torch.arange(n, dtype=torch.int64, device=device)
    key = _key(seed, tag, counter)
    if isinstance(key, Tensor):
        key = key.to(idx.device).unsqueeze(-1)
    h = hash_u32((idx * 0x27D4EB2F + key) & _M32)
    return torch.argsort((h << 31) | idx, dim=-1)


#: Up to this many subnetworks the schedule uses :func:`seeded_permutation` (the
#: permutations of 0.1.0, unchanged); above it :func:`feistel_permutation`.
SORTED_PERMUTATION_MAX = 2**20

_FEISTEL_ROUNDS = 6


def feistel_permutation(seed: int, tag: int, counter: int, n: int, index: Tensor) -> Tensor:
    """Entries ``index`` of a seeded permutation of ``range(n)``, without building it.

    A balanced Feistel network over ``2h`` bits (``4**h >= n``, round keys from
    ``(seed, tag, counter, round)``, round function :func:`hash_grid`) is a bijection
    of ``range(4**h)``; cycle walking (apply it again while the value is ``>= n``)
    restricts it to a bijection of ``range(n)``. Cost O(len(index)) (about 4 walks per
    entry at most on average), memory O(len(index)), for any ``n`` up to 2**62.
    Returned on ``index``'s device as int64.
    """
    if not 1 <= n <= 2**62:
        raise ValueError(f"feistel_permutation: n must be in [1, 2**62], got {n}")
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    low = (1 << half) - 1
    keys = [mix_keys(seed, tag, counter, r) for r in range(_FEISTEL_ROUNDS)]

    def rounds(v: Tensor) -> Tensor:
        left, right = v >> half, v & low
        for key in keys:
            left, right = right, left ^ (hash_grid(key, right) & low)
        return (left << half) | right

    out = rounds(index.to(torch.int64))
    outside = out >= n
    while bool(outside.any()):
        out = torch.where(outside, rounds(out), out)
        outside = out >= n
    return out


def seeded_draws(
    seed: int | Tensor,
    tag: int,
    counter: int | Tensor,
    count: int,
    n: int,
    device: torch.device | None = None,
) -> Tensor:
    """``count`` draws from ``range(n)``, uniform with replacement, that depend only on
    ``(seed, tag, counter)``; int64 on ``device`` (default: the CPU), shape ``(count,)``
    (``seed``/``counter`` may be 0-d int64 tensors: the same values).

    Each draw is a 32-bit hash reduced modulo ``n`` (bias below ``n / 2**32``).

    Example:
        >>> d = seeded_draws(0, TAG_REPLACE_SET, 3, 5, 4)
        >>> d.shape, bool(((d >= 0) & (d < 4)).all())
        (torch.Size([5]), True)
    """
    if n < 1 or count < 0:
        raise ValueError(f"seeded_draws: need n >= 1 and count >= 0, got n={n}, count={count}")
    idx = torch.arange(count, dtype=torch.int64, device=device)
    key = _key(seed, tag, counter)
    if isinstance(key, Tensor):
        key = key.to(idx.device)
    h = hash_u32((idx * 0x165667B1 + key) & _M32)
    return hash_u32((h + _GOLDEN) & _M32) % n


def element_keep_mask(
    seed: int | Tensor, subnets: Tensor, numel: int, p: float, device: torch.device | None = None
) -> Tensor:
    """Element-wise keep masks of the given subnetworks, shape ``(len(subnets), numel)``.

    Each element is dropped independently with probability ``p`` (a Bernoulli draw
    made deterministic by hashing ``(seed, k, element index)``).
    """
    subnets = subnets.to(device=device, dtype=torch.int64)
    base = _subnet_bases(seed, TAG_ELEMENT, subnets)
    index = torch.arange(numel, dtype=torch.int64, device=subnets.device)
    return hash_grid(base, index) >= drop_threshold(p)


def block_keep_mask(
    seed: int | Tensor,
    subnets: Tensor,
    n_blocks: int,
    n_drop: int,
    device: torch.device | None = None,
) -> Tensor:
    """Block keep masks, shape ``(len(subnets), n_blocks)``, with exactly ``n_drop``
    blocks dropped in every mask (the ``n_drop`` blocks of smallest hash)."""
    if not 0 <= n_drop <= n_blocks:
        raise ValueError(f"n_drop must be in [0, {n_blocks}], got {n_drop}")
    subnets = subnets.to(device=device, dtype=torch.int64)
    base = _subnet_bases(seed, TAG_BLOCK, subnets)
    index = torch.arange(n_blocks, dtype=torch.int64, device=subnets.device)
    order = torch.argsort((hash_grid(base, index) << 31) | index, dim=1)
    keep = torch.ones(len(subnets), n_blocks, dtype=torch.bool, device=subnets.device)
    keep.scatter_(1, order[:, :n_drop], False)
    return keep


def block_bounds(features: int, block_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each block; the last block is shorter when needed."""
    return [(s, min(s + block_size, features)) for s in range(0, features, block_size)]
