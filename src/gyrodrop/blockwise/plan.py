"""The plan of one block-wise step: which blocks every row group keeps, as indices.

:func:`n_dropped_blocks` fixes how many blocks every mask drops; :func:`build_plan`
turns the kept-block lists of the active set and the batch layout (rows per group)
into the gather/scatter indices the torch kernels (:mod:`gyrodrop.blockwise.kernels`)
read. A plan is derived state: cached by the layer, rebuilt when the active set or the
batch layout changes, never saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Plan", "build_plan", "n_dropped_blocks"]


def n_dropped_blocks(p: float, n_blocks: int) -> int:
    """Blocks dropped by every mask: ``p * n_blocks`` to the nearest integer, halves up.

    >>> n_dropped_blocks(0.5, 32), n_dropped_blocks(0.1, 32), n_dropped_blocks(0.5, 3)
    (16, 3, 2)
    """
    return int(math.floor(p * n_blocks + 0.5))


@dataclass(frozen=True)
class Plan:
    """Everything the pruned GEMMs need for one active set and one batch layout.

    ``G`` active row groups (groups with at least one local row), ``n`` rows per group
    in the batched layout (the largest group; smaller groups are padded), ``kb`` kept
    blocks per group. Index tensors address ``(rows * n_blocks, block_size)`` views.
    """

    groups: int
    rows_per_group: int
    kept_blocks: int
    blocks: Tensor  # (G * kb,) kept block ids, group-major (gather of W's blocks)
    gather: Tensor  # (G * n * kb,) block-rows of the masked activation, gather side
    scatter: Tensor | None  # same, padded rows sent to a dummy block-row (None: uniform)
    row_src: Tensor | None  # (G * n,) source row of each batched row (None: uniform)
    real_pos: Tensor | None  # (R,) batched position of each real row (None: uniform)
    row_valid: Tensor | None  # (G, n, 1) 1 for real rows, 0 for padding (None: uniform)
    w_rows: Tensor | None  # input pruning: (out * G * kb,) block-rows of W's (out * nb, bs)


def build_plan(
    kept: Tensor, counts: list[int], rows_per_sample: int, n_blocks: int, out_features: int | None
) -> Plan:
    """Indices for the kept-block lists ``kept`` (``(tau, kb)``, sorted) and the local
    row counts of the tau groups (in samples; each sample has ``rows_per_sample`` rows)."""
    device = kept.device
    active = [g for g, c in enumerate(counts) if c > 0]
    rows = [counts[g] * rows_per_sample for g in active]
    groups, n = len(active), max(rows)
    kept = kept[torch.tensor(active, dtype=torch.int64, device=device)]  # (G, kb)
    kb = kept.shape[1]
    total = sum(rows)
    starts = torch.tensor([sum(rows[:g]) for g in range(groups)], device=device)
    sizes = torch.tensor(rows, device=device)
    r = torch.arange(n, device=device)
    valid = r[None, :] < sizes[:, None]  # (G, n)
    src = starts[:, None] + torch.where(valid, r[None, :], 0)  # padding repeats row 0 of g
    gather = (src[:, :, None] * n_blocks + kept[:, None, :]).reshape(-1)  # (G * n * kb,)
    uniform = all(r == n for r in rows)  # from the counts: no device sync, traceable
    if uniform:
        scatter, row_src, real_pos, row_valid = None, None, None, None
    else:
        dummy = torch.full_like(gather, total * n_blocks)
        scatter = torch.where(valid[:, :, None].expand(-1, -1, kb).reshape(-1), gather, dummy)
        row_src = src.reshape(-1)
        real_pos = (torch.arange(groups, device=device)[:, None] * n + r[None, :])[valid]
        row_valid = valid[:, :, None]
    w_rows = None
    if out_features is not None:
        o = torch.arange(out_features, device=device)
        w_rows = (o[:, None] * n_blocks + kept.reshape(1, -1)).reshape(-1)
    return Plan(
        groups, n, kb, kept.reshape(-1), gather, scatter, row_src, real_pos, row_valid, w_rows
    )
