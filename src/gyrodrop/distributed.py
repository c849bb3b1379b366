"""Rows of the global batch under ``torch.distributed``, hence which subnetworks.

Gyro row groups are assigned over the *global* batch: with ``world`` processes holding
``B`` rows each, rank ``r`` holds global rows ``[r * B, (r + 1) * B)``. Each rank applies
the masks of its own rows, so a DDP run trains exactly like one process with the
concatenated batch, and no communication is needed per step.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["row_window", "group_sizes", "local_group_counts"]


def row_window(local_batch: int) -> tuple[int, int]:
    """``(first global row, global batch size)`` of this process's ``local_batch`` rows.

    Without an initialized process group this is ``(0, local_batch)``.
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return dist.get_rank() * local_batch, world * local_batch
    return 0, local_batch


def group_sizes(global_batch: int, groups: int) -> list[int]:
    """Sizes of ``groups`` contiguous row groups of a batch: they differ by at most one,
    the larger ones first; with fewer rows than groups the trailing groups are empty."""
    q, r = divmod(global_batch, groups)
    return [q + 1] * r + [q] * (groups - r)


def local_group_counts(start: int, local_batch: int, global_batch: int, groups: int) -> list[int]:
    """Rows of each group that fall in the window ``[start, start + local_batch)``."""
    counts, lo = [], 0
    stop = start + local_batch
    for size in group_sizes(global_batch, groups):
        hi = lo + size
        counts.append(max(0, min(hi, stop) - max(lo, start)))
        lo = hi
    return counts
