"""Rows of the global batch under ``torch.distributed``, hence which subnetworks.

Gyro row groups are assigned over the *global* batch. With ``world`` processes holding
``B`` rows each, rank ``r`` holds global rows ``[r * B, (r + 1) * B)`` (the order in which
:class:`~torch.utils.data.distributed.DistributedSampler` deals out a batch does not
matter: only the row positions decide the groups). Every rank applies the masks of its
own rows, so a data-parallel run trains exactly like one process holding the
concatenated batch, and nothing is communicated per step: the active set comes from
``(seed, step)``, and the step counters move in lock-step because every rank runs the
same number of training forwards (or calls :func:`gyrodrop.step` after the same
optimizer steps).

Uneven batches. The default rule needs no communication and assumes every rank holds
as many rows as this one. That is exact whenever the ranks' local batches have equal
size, which :class:`~torch.utils.data.distributed.DistributedSampler` guarantees (it
pads the dataset with repeated samples, or drops the tail with ``drop_last=True``, so
each rank gets ``ceil(N / world)`` (or ``floor``) samples, and the DataLoader's last,
shorter batch is equally short on every rank). When the sizes can differ (a custom
sampler, :class:`~torch.distributed.algorithms.Join`), the default still gives every row
a mask of the active set, each rank grouping its rows as if the others had as many; the
step is then not bit-identical to the single-process run. For the exact layout, wrap the
forward in :func:`batch_layout`, which all-gathers the local sizes (one small collective,
entered by every rank). Gathering only when a rank's size changes is not possible: the
rank whose size did not change would not enter the collective, and the others would hang.

Independent ranks. When the processes are not replicas of one data-parallel model (each
rank trains its own model, or evaluates on its own), use :func:`independent_ranks` (a
context manager) or ``set_row_mode("local")`` (process-wide): every rank then groups only
its own rows, as a single process would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from gyrodrop._modules import unwrap_model
from gyrodrop._validation import check_choice
from gyrodrop.schedule import SteppedModule

__all__ = [
    "row_window",
    "window_for",
    "group_sizes",
    "local_group_counts",
    "set_row_mode",
    "get_row_mode",
    "independent_ranks",
    "batch_layout",
    "gather_local_sizes",
    "check_lockstep",
    "sync_steps",
]

#: Rows of the global batch (``global``) or of each rank's own batch (``local``).
RowMode = Literal["global", "local"]
ROW_MODES: tuple[RowMode, ...] = ("global", "local")


@dataclass(frozen=True)
class _Layout:
    """How local rows map to global rows: ``mode`` ``"global"`` (over all ranks of
    ``group``) or ``"local"`` (each rank alone); ``sizes``: every rank's local batch
    (exact layout) or ``None`` (assume equal sizes)."""

    mode: str = "global"
    sizes: tuple[int, ...] | None = None
    group: Any = None


_default_layout = _Layout()
_scoped_layout: ContextVar[_Layout | None] = ContextVar("gyrodrop_row_layout", default=None)
# The innermost scoped layout, mirrored in a plain global for torch.compile (Dynamo
# cannot read a ContextVar; it guards on this global, so entering or leaving a scope
# recompiles). Kept in step by _enter/_leave; per thread only through the ContextVar.
_compiled_layout: _Layout | None = None


def _layout() -> _Layout:
    scoped = _compiled_layout if torch.compiler.is_compiling() else _scoped_layout.get()
    return _default_layout if scoped is None else scoped


@contextlib.contextmanager
def _scope(layout: _Layout) -> Iterator[None]:
    global _compiled_layout
    token = _scoped_layout.set(layout)
    previous, _compiled_layout = _compiled_layout, layout
    try:
        yield
    finally:
        _scoped_layout.reset(token)
        _compiled_layout = previous


def _rank_and_world(group: Any) -> tuple[int, int] | None:
    """``(rank, world)`` in ``group``, or ``None`` without a process group (or when this
    process is not a member of ``group``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank(group)
    if rank < 0:
        return None
    return rank, dist.get_world_size(group)


def _check_sizes(owner: str, sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ValueError(f"{owner}: sizes must be a sequence of ints, got {sizes!r}")
    out = tuple(sizes)
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise ValueError(
            f"{owner}: sizes must be a non-empty sequence of ints >= 0, got {list(out)}"
        )
    return out


def window_for(
    rank: int, world: int, local_batch: int, sizes: Sequence[int] | None = None
) -> tuple[int, int]:
    """``(first global row, global batch size)`` of rank ``rank``'s ``local_batch`` rows.

    The pure rule behind :func:`row_window`. Without ``sizes`` every rank is assumed to
    hold ``local_batch`` rows. With ``sizes`` (every rank's local batch, in rank order)
    the layout is exact: rank ``r`` starts after the rows of ranks ``0..r-1``. A module
    that sees ``k`` times its rank's rows (an input reshaped from ``(B, T, F)`` to
    ``(B * T, F)``) scales the whole layout by ``k``, which is where those rows sit in
    the reshaped global batch.

    Example:
        >>> window_for(1, 2, 4)  # two ranks of 4 rows: rows 4..7 of 8
        (4, 8)
        >>> window_for(1, 2, 3, sizes=[4, 3])  # uneven: rows 4..6 of 7
        (4, 7)
        >>> window_for(1, 2, 6, sizes=[4, 3])  # (B*T, F) with T=2: rows 8..13 of 14
        (8, 14)
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"window_for: need 0 <= rank < world, got rank={rank}, world={world}")
    if local_batch < 0:
        raise ValueError(f"window_for: local_batch must be >= 0, got {local_batch}")
    if sizes is None:
        return rank * local_batch, world * local_batch
    sizes = _check_sizes("window_for", sizes)
    if len(sizes) != world:
        raise ValueError(
            f"window_for: sizes must list the local batch of each of the {world} ranks, "
            f"got {len(sizes)} sizes {list(sizes)}"
        )
    own = sizes[rank]
    if local_batch == own:
        scale = 1
    elif own > 0 and local_batch % own == 0:
        scale = local_batch // own
    else:
        raise ValueError(
            f"window_for: this rank's input has {local_batch} rows but its declared local "
            f"batch is {own} (sizes={list(sizes)}); the rows must be the local batch or a "
            "whole multiple of it (a (B, T, F) input reshaped to (B*T, F)); "
            "hint: pass the local batch size of this forward to batch_layout()"
        )
    return scale * sum(sizes[:rank]), scale * sum(sizes)


def row_window(local_batch: int) -> tuple[int, int]:
    """``(first global row, global batch size)`` of this process's ``local_batch`` rows.

    Without an initialized process group, or in ``"local"`` row mode (see
    :func:`independent_ranks`), this is ``(0, local_batch)``. Otherwise rank ``r`` of
    ``world`` holds rows ``[r * local_batch, (r + 1) * local_batch)`` of a global batch
    of ``world * local_batch`` rows, or the exact layout declared by
    :func:`batch_layout`.

    Example:
        >>> row_window(8)  # one process
        (0, 8)
    """
    layout = _layout()
    if layout.mode == "local":
        return 0, local_batch
    place = _rank_and_world(layout.group)
    if place is None:
        return 0, local_batch
    rank, world = place
    return window_for(rank, world, local_batch, layout.sizes)


def group_sizes(global_batch: int, groups: int) -> list[int]:
    """Sizes of ``groups`` contiguous row groups of a batch: they differ by at most one,
    the larger ones first; with fewer rows than groups the trailing groups are empty.

    Example:
        >>> group_sizes(8, 3)
        [3, 3, 2]
    """
    q, r = divmod(global_batch, groups)
    return [q + 1] * r + [q] * (groups - r)


def local_group_counts(start: int, local_batch: int, global_batch: int, groups: int) -> list[int]:
    """Rows of each group that fall in the window ``[start, start + local_batch)``.

    Example:
        >>> local_group_counts(4, 4, 8, 3)  # rank 1 of 2, groups [3, 3, 2] over 8 rows
        [0, 2, 2]
    """
    if start < 0 or local_batch < 0 or start + local_batch > global_batch or groups < 1:
        raise ValueError(
            f"local_group_counts: the rows [{start}, {start + local_batch}) must lie in the "
            f"global batch [0, {global_batch}) and groups must be >= 1, got groups={groups}; "
            "the groups would not cover the local batch"
        )
    counts, lo = [], 0
    stop = start + local_batch
    for size in group_sizes(global_batch, groups):
        hi = lo + size
        counts.append(max(0, min(hi, stop) - max(lo, start)))
        lo = hi
    return counts


def set_row_mode(mode: RowMode = "global", *, group: Any = None) -> None:
    """Set the process-wide row mode: ``"global"`` (the default: row groups span the
    batches of all ranks of ``group``, the default group when ``None``) or ``"local"``
    (each rank groups only its own rows, for ranks that are not data-parallel replicas).

    ``group`` names the data-parallel process group when it is not the whole world
    (data parallelism combined with tensor or pipeline parallelism). The context
    managers :func:`independent_ranks` and :func:`batch_layout` override it in a scope.
    """
    global _default_layout
    check_choice("set_row_mode", "mode", mode, ROW_MODES)
    _default_layout = _Layout(mode=mode, group=group)


def get_row_mode() -> str:
    """The row mode in effect here: ``"global"`` or ``"local"``."""
    return _layout().mode


@contextlib.contextmanager
def independent_ranks() -> Iterator[None]:
    """Within this scope every rank groups only its own rows (``"local"`` row mode).

    Use it when ranks are not replicas of one data-parallel model: each trains its own
    model, or evaluates on its own data with dropout active (MC dropout).

    Example:
        >>> with independent_ranks():
        ...     get_row_mode()
        'local'
    """
    with _scope(_Layout(mode="local")):
        yield


def gather_local_sizes(local_batch: int, group: Any = None) -> list[int]:
    """Every rank's ``local_batch``, in rank order (a collective: all ranks of ``group``
    must call it). Without a process group: ``[local_batch]``."""
    if isinstance(local_batch, bool) or not isinstance(local_batch, int) or local_batch < 0:
        raise ValueError(
            f"gather_local_sizes: local_batch must be an int >= 0, got {local_batch!r}"
        )
    place = _rank_and_world(group)
    if place is None:
        return [local_batch]
    out: list[Any] = [None] * place[1]
    dist.all_gather_object(out, local_batch, group=group)
    return [int(s) for s in out]


@contextlib.contextmanager
def batch_layout(
    local_batch: int | None = None, *, sizes: Sequence[int] | None = None, group: Any = None
) -> Iterator[tuple[int, ...] | None]:
    """Within this scope, row groups follow the exact layout of a global batch whose
    ranks hold different numbers of rows (uneven last batches).

    Pass this rank's ``local_batch`` to all-gather every rank's size (a collective: every
    rank of ``group`` must enter the scope, so call it on all ranks every step, or on
    every rank for the step that may be uneven), or pass the known ``sizes`` of all ranks
    (no communication). Yields the sizes (``None`` without a process group).

    Example (in a DDP training loop)::

        with gyrodrop.distributed.batch_layout(x.shape[0]):
            loss = criterion(model(x), y)
    """
    if (local_batch is None) == (sizes is None):
        raise ValueError("batch_layout: pass exactly one of local_batch and sizes")
    place = _rank_and_world(group)
    layout_sizes: tuple[int, ...] | None
    if sizes is not None:
        declared = _check_sizes("batch_layout", sizes)
        if place is not None and len(declared) != place[1]:
            raise ValueError(
                f"batch_layout: sizes must list the local batch of each of the {place[1]} "
                f"ranks, got {len(declared)} sizes {list(declared)}"
            )
        layout_sizes = declared
    else:
        gathered = gather_local_sizes(local_batch, group)  # type: ignore[arg-type]
        layout_sizes = tuple(gathered) if place is not None else None
    with _scope(_Layout(mode="global", sizes=layout_sizes, group=group)):
        yield layout_sizes


def _stepped_modules(model: nn.Module) -> list[tuple[str, SteppedModule]]:
    return [
        (name, module)
        for name, module in unwrap_model(model).named_modules()
        if isinstance(module, SteppedModule)
    ]


def check_lockstep(model: nn.Module, group: Any = None) -> None:
    """Raise ``RuntimeError`` unless every rank's gyrodrop modules have the same names,
    steps and seeds (a collective; a debugging aid, nothing needs it per step).

    Without a process group it returns at once.
    """
    place = _rank_and_world(group)
    if place is None:
        return
    mine = [(name, int(m.step), int(m.seed)) for name, m in _stepped_modules(model)]
    every: list[Any] = [None] * place[1]
    dist.all_gather_object(every, mine, group=group)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            diff = [(a, b) for a, b in zip(every[0], theirs, strict=False) if a != b][:3]
            raise RuntimeError(
                f"check_lockstep: rank {rank} differs from rank 0 in its gyrodrop modules "
                f"(name, step, seed): first differences {diff}, "
                f"{len(every[0])} vs {len(theirs)} modules"
            )


@torch.no_grad()
def sync_steps(model: nn.Module, group: Any = None) -> int:
    """Set every gyrodrop module's step to its maximum over the ranks of ``group`` and
    return the largest step (a collective).

    Only needed when ranks ran different numbers of steps, e.g. after
    :class:`~torch.distributed.algorithms.Join` let a rank with fewer batches finish an
    epoch early: call it on every rank before the next epoch.
    """
    modules = [m for _, m in _stepped_modules(model)]
    if not modules:
        return 0
    steps = torch.stack([m.step.detach() for m in modules]).to(modules[0].step.device)
    if _rank_and_world(group) is not None:
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
    for module, value in zip(modules, steps.tolist(), strict=True):
        module.step.fill_(int(value))
    return int(steps.max())
