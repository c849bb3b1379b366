"""Block-wise gyro dropout fused into a Linear layer, with pruned GEMMs.

Block-wise gyro dropout (Lee et al., MLSys 2022, section 4) drops blocks of
``block_size`` adjacent neurons instead of single neurons, and every subnetwork mask
drops exactly ``round(p * n_blocks)`` blocks. The batch is split into
``subnets_per_step`` contiguous row groups, one mask each (as in
:class:`~gyrodrop.GyroDropout`), so every group keeps the same number of blocks and one
batched GEMM computes all groups on their kept columns only: the dropped blocks are
never multiplied, in the forward pass, in the input gradient or in the weight gradient.

Two placements, as in the paper (section 4.3):

* ``prune="input"`` (``Dropout -> Linear``): the mask is on the Linear's *input*
  features. The forward computes ``x_g[:, K_g] @ W[:, K_g].T`` per group ``g`` (``K_g``
  its kept input columns); the input gradient is ``dy_g @ W[:, K_g]`` scattered into
  the kept columns (dropped columns get zero, as dropout would give); the weight
  gradient ``dy_g.T @ x_g[:, K_g]`` only touches the kept columns of ``W``. The output
  is dense.
* ``prune="output"`` (``Linear -> Dropout``): the mask is on the Linear's *output*
  features. Only the kept output columns are computed, the others are written as zeros
  (the layer's output is what dropout after the Linear would give); the input gradient
  and the weight gradient use only the kept rows of ``W``. It pays a scatter of the
  output and a gather of the output gradient that input pruning does not need, but its
  gathers of ``W`` move whole rows; on the CPU both placements cost about the same.

Either placement shrinks the three GEMMs of *its* Linear to about ``1 - p``, so the
choice is which Linear next to a dropout is bigger: input pruning for the one after it,
output pruning for the one before it (through a ReLU, which commutes with a non-negative
mask), and output pruning where the dropout feeds no Linear (a residual add, a norm).
:func:`find_block_sites` with ``prune="auto"`` makes that choice for a whole model.

Memory layout: ``W`` is ``(out, in)`` row-major, so an input block of ``W`` is
``block_size`` contiguous floats in each row and an output block is ``block_size``
contiguous rows. All gathers and scatters are done at block granularity
(``index_select`` / ``index_copy_`` / ``index_add_`` over contiguous slices of
``block_size`` elements) on views ``(rows * n_blocks, block_size)``, so they are
memcpy-like; per-group GEMM results are written straight into the layout the next op
reads (a strided ``bmm`` output), and temporaries live in per-layer scratch buffers
reused across steps (:class:`_Workspace`). The per-set indices are cached (derived
state: rebuilt when the active set or the batch layout changes, never in
``state_dict``).

Scaling: the mask scales kept features by ``1 / (1 - p_eff)`` with
``p_eff = n_drop / n_blocks`` (:attr:`BlockGyroLinear.effective_p`), the realized
fraction of dropped *blocks*. It is the same for every mask, and since every block is
equally likely to be dropped, every feature is kept with probability exactly
``1 - p_eff``: the scaling is unbiased per feature, including a shorter last block.

Features not divisible by ``block_size``: the last block is shorter. To keep equal kept
widths across groups (one batched GEMM) the layer works on a zero-padded feature space
of ``n_blocks * block_size`` features: the padded columns are zeros, so they contribute
nothing, and the gradients are cut back to the true width. This costs one copy of
``W`` and of the activation per step, and only in that case.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gyrodrop import blockwise_triton, masks
from gyrodrop._validation import check_bool, check_choice, check_int, check_p
from gyrodrop.blockwise_triton import TritonPlan
from gyrodrop.schedule import Schedule, SteppedModule, check_input
from gyrodrop.scheduled import ScheduledModule

__all__ = [
    "BACKENDS",
    "BlockGyroLinear",
    "BlockSite",
    "PRUNE_MODES",
    "find_block_sites",
    "n_dropped_blocks",
]

#: Which side of the weight a dropped block removes (input columns or output rows).
Prune = Literal["input", "output"]
PRUNE_MODES: tuple[Prune, ...] = ("input", "output")
#: Which kernels compute the pruned matmuls.
Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")


def n_dropped_blocks(p: float, n_blocks: int) -> int:
    """Blocks dropped by every mask: ``p * n_blocks`` to the nearest integer, halves up.

    >>> n_dropped_blocks(0.5, 32), n_dropped_blocks(0.1, 32), n_dropped_blocks(0.5, 3)
    (16, 3, 2)
    """
    return int(math.floor(p * n_blocks + 0.5))


# --------------------------------------------------------------------------------------
# The plan: indices of one active set for one batch layout (derived, cached state).


@dataclass(frozen=True)
class _Plan:
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


def _build_plan(
    kept: Tensor, counts: list[int], rows_per_sample: int, n_blocks: int, out_features: int | None
) -> _Plan:
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
    uniform = bool(valid.all())
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
    return _Plan(
        groups, n, kb, kept.reshape(-1), gather, scatter, row_src, real_pos, row_valid, w_rows
    )


# --------------------------------------------------------------------------------------
# Autocast: the GEMMs run in the autocast dtype when autocast is on, like F.linear.


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device, or ``None`` when autocast is off or does
    not apply (autocast casts float32 and lower, never float64)."""
    device_type = x.device.type
    if not _autocast_enabled(device_type) or not x.is_floating_point():
        return None
    if x.dtype == torch.float64:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype()
        return torch.get_autocast_gpu_dtype()


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for the GEMMs (their operands are already in the compute dtype);
    a no-op context when autocast is off anyway (building one costs microseconds)."""
    if _autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Scratch buffers reused across steps.


class _Workspace:
    """Scratch buffers of one module, reused from step to step.

    The gathered blocks of ``W`` and of the activation, and the per-group GEMM results
    before they are scattered, never escape the layer: nothing returned points into
    them. Allocating them afresh every step costs page faults on first touch (on the
    2-core test VM, about a millisecond per fresh megabyte, comparable to the pruned
    GEMMs themselves), so each module keeps them (per thread) and reuses them. They are
    not state: not in ``state_dict``, rebuilt on another device or dtype. Under
    ``torch.compile`` they are not used (the compiler plans memory itself).

    Every :meth:`take` stamps the buffer, so a backward pass can tell whether the
    buffers its forward filled are still untouched (the usual forward, backward,
    forward, ... order) and reuse their contents, or must gather again (another forward
    came first, a second backward through a retained graph, another thread).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], Tensor] = {}
        self._stamps: dict[tuple[str, int], int] = {}
        self._counter = 0

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        key = (name, threading.get_ident())
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or (buf.device != like.device)
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        self._counter += 1
        self._stamps[key] = self._counter
        return buf[:numel].view(shape)

    def stamp(self, name: str) -> tuple[tuple[str, int], int]:
        """The current stamp of this thread's buffer ``name``."""
        key = (name, threading.get_ident())
        return key, self._stamps.get(key, 0)

    def unchanged(self, stamp: tuple[tuple[str, int], int]) -> bool:
        """Whether the buffer was not taken again since ``stamp`` (same thread only)."""
        key, value = stamp
        return key[1] == threading.get_ident() and self._stamps.get(key, 0) == value

    def clear(self) -> None:
        """Free the buffers (they are rebuilt on the next training step)."""
        self._buffers.clear()
        self._stamps.clear()


def _scratch(ws: _Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A workspace buffer, or a fresh tensor without a workspace."""
    if ws is None:
        return like.new_empty(shape)
    return ws.take(name, shape, like)


def _gather_rows(
    src: Tensor, index: Tensor, shape: tuple[int, ...], ws: _Workspace | None, name: str
) -> Tensor:
    """``src.index_select(0, index)`` (rows of block slices) into a workspace buffer."""
    out = _scratch(ws, name, (index.numel(), src.shape[1]), src)
    torch.index_select(src, 0, index, out=out)
    return out.view(shape)


# --------------------------------------------------------------------------------------
# Input pruning: block dropout on the Linear's input, fused into the GEMMs.


class _InputPrunedLinear(torch.autograd.Function):
    """``y = (x * mask) @ W.T + b`` computed on the kept input blocks only.

    ``x`` is ``(R, Fp)`` and ``weight`` ``(O, Fp)`` with ``Fp = n_blocks * block_size``;
    the scaled mask is implied by the plan's indices and ``scale``. Only ``x`` and
    ``weight`` are saved: backward gathers their kept blocks again (cheaper than
    keeping ``tau * (1 - p)`` copies of ``W`` alive between forward and backward).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        blocks: Tensor,
        gather: Tensor,
        scatter: Tensor | None,
        real_pos: Tensor | None,
        w_rows: Tensor,
        groups: int,
        rows_per_group: int,
        block_size: int,
        scale: float,
        dtype: torch.dtype | None,
        ws: _Workspace | None,
    ) -> Tensor:
        out = weight.shape[0]
        g, n, bs = groups, rows_per_group, block_size
        k = blocks.numel() // g * bs
        wg, xk = _InputPrunedLinear._gather(x, weight, gather, w_rows, g, n, k, bs, dtype, ws)
        xk.mul_(scale)  # the dropout scaling, applied once to the kept values
        wt = wg.permute(1, 2, 0)  # (G, k, O): a transposed view, no copy
        if bias is None:
            yk = torch.bmm(xk, wt)
        else:
            b = bias if dtype is None else bias.to(dtype)
            yk = torch.baddbmm(b.view(1, 1, out).expand(g, n, out), xk, wt)
        y = yk.view(g * n, out)  # groups are consecutive rows: already in row order
        if real_pos is not None:
            y = y.index_select(0, real_pos)  # drop the padding rows
        ctx.save_for_backward(x, weight, blocks, gather, scatter, real_pos, w_rows)
        ctx.meta = (g, n, bs, scale, dtype, ws)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # backward reuses the gathered blocks if nothing took the buffers in between
        ctx.reuse = None
        if ws is not None and dtype is None:
            ctx.reuse = (wg, xk, ws.stamp("w"), ws.stamp("x"))
        return y

    @staticmethod
    def _gather(
        x: Tensor,
        weight: Tensor,
        gather: Tensor,
        w_rows: Tensor,
        g: int,
        n: int,
        k: int,
        bs: int,
        dtype: torch.dtype | None,
        ws: _Workspace | None,
    ) -> tuple[Tensor, Tensor]:
        out = weight.shape[0]
        # the kept input blocks of W for every group: 128-byte block slices gathered
        # as rows (memcpy-like): (O*G*kb, bs) = (O, G, k)
        wg = _gather_rows(weight.reshape(-1, bs), w_rows, (out, g, k), ws, "w")
        # the kept blocks of every row of x, batched by group: (G, n, k)
        xk = _gather_rows(x.reshape(-1, bs), gather, (g, n, k), ws, "x")
        if dtype is not None:
            wg, xk = wg.to(dtype), xk.to(dtype)
        return wg, xk

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            ctx.reuse = None
            return _InputPrunedLinear._differentiable_backward(ctx, dy) + (None,) * 11
        x, weight, blocks, gather, scatter, real_pos, w_rows = ctx.saved_tensors
        g, n, bs, scale, dtype, ws = ctx.meta
        rows, fp = x.shape
        out = weight.shape[0]
        nb, k = fp // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with _autocast_off(dy):
            if need_b:
                db = dy.sum(0).to(b_dtype)
            reuse, ctx.reuse = ctx.reuse, None
            if reuse is not None and ws.unchanged(reuse[2]) and ws.unchanged(reuse[3]):
                wg, xk = reuse[0], reuse[1]  # xk is scaled already
            else:
                wg, xk = _InputPrunedLinear._gather(
                    x, weight, gather, w_rows, g, n, k, bs, dtype, ws
                )
                xk.mul_(scale)
            dy = dy.to(wg.dtype)
            if real_pos is None:
                dyk = dy.reshape(g, n, out)
            else:  # padding rows get a zero gradient, so they add nothing to dW
                dyk = dy.new_zeros(g * n, out).index_copy_(0, real_pos, dy).view(g, n, out)
            if need_x:
                dxk = _scratch(ws, "dx", (g, n, k), dy)
                torch.bmm(dyk, wg.permute(1, 0, 2), out=dxk)  # (G, n, k)
                dxk.mul_(scale)
                # scatter into the kept blocks; the extra block-row takes the padding
                dx = dy.new_zeros(rows * nb + 1, bs)
                dx.index_copy_(0, gather if scatter is None else scatter, dxk.view(-1, bs))
                dx = dx[: rows * nb].view(rows, fp).to(x_dtype)
            if need_w:
                # (G, O, k) on the kept columns only, written straight into an (O, G, k)
                # buffer (a strided output, no copy; it reuses W's gathered blocks, no
                # longer needed), so the sum over groups is one index_add of contiguous
                # block slices into the columns of dW
                dwk = wg
                if ws is not None:
                    ws.take("w", (out, g, k), wg)  # it is overwritten: restamp it
                torch.bmm(dyk.transpose(1, 2), xk, out=dwk.permute(1, 0, 2))
                dw = dy.new_zeros(out, nb, bs).index_add_(1, blocks, dwk.view(out, -1, bs))
                dw = dw.view(out, fp).to(w_dtype)
        return (dx, dw, db) + (None,) * 11

    @staticmethod
    def _differentiable_backward(
        ctx: Any, dy: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dW, db)`` with differentiable out-of-place ops only (no workspace,
        no ``out=``, no in-place writes), still on the kept blocks only, so that autograd
        records them when the backward itself is differentiated (``create_graph=True``:
        gradient penalties, double backward). Same formulas as :meth:`backward`."""
        x, weight, blocks, gather, scatter, real_pos, w_rows = ctx.saved_tensors
        g, n, bs, scale, dtype, _ = ctx.meta
        rows, fp = x.shape
        out = weight.shape[0]
        nb, k = fp // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with _autocast_off(dy):
            if need_b:
                db = dy.sum(0).to(b_dtype)
            wg = weight.reshape(-1, bs).index_select(0, w_rows).view(out, g, k)
            if dtype is not None:
                wg = wg.to(dtype)
            dy = dy.to(wg.dtype)
            if real_pos is None:
                dyk = dy.reshape(g, n, out)
            else:  # padding rows get a zero gradient
                dyk = dy.new_zeros(g * n, out).index_copy(0, real_pos, dy).view(g, n, out)
            if need_x:
                dxk = torch.bmm(dyk, wg.permute(1, 0, 2)) * scale  # (G, n, k)
                index = gather if scatter is None else scatter
                dx = dy.new_zeros(rows * nb + 1, bs).index_copy(0, index, dxk.reshape(-1, bs))
                dx = dx[: rows * nb].view(rows, fp).to(x_dtype)
            if need_w:
                xk = x.reshape(-1, bs).index_select(0, gather).view(g, n, k)
                xk = (xk if dtype is None else xk.to(dtype)) * scale
                dwk = torch.bmm(dyk.transpose(1, 2), xk).permute(1, 0, 2)  # (O, G, k)
                dw = dy.new_zeros(out, nb, bs).index_add(1, blocks, dwk.reshape(out, -1, bs))
                dw = dw.view(out, fp).to(w_dtype)
        return dx, dw, db


# --------------------------------------------------------------------------------------
# Output pruning: block dropout on the Linear's output, fused into the GEMMs.


class _OutputPrunedLinear(torch.autograd.Function):
    """``y = (x @ W.T + b) * mask`` computed on the kept output blocks only.

    ``x`` is ``(R, I)``, ``weight`` ``(Op, I)`` with ``Op = n_blocks * block_size``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        blocks: Tensor,
        row_src: Tensor | None,
        gather: Tensor,
        scatter: Tensor | None,
        real_pos: Tensor | None,
        row_valid: Tensor | None,
        groups: int,
        rows_per_group: int,
        block_size: int,
        scale: float,
        dtype: torch.dtype | None,
        ws: _Workspace | None,
    ) -> Tensor:
        rows, fin = x.shape
        op = weight.shape[0]
        g, n, bs = groups, rows_per_group, block_size
        nb, ko = op // bs, blocks.numel() // g * bs
        wg, xg = _OutputPrunedLinear._gather(x, weight, blocks, row_src, g, n, ko, bs, dtype, ws)
        wt = wg.transpose(1, 2)  # (G, I, ko): a transposed view, no copy
        yk = _scratch(ws, "y", (g, n, ko), wg)
        if bias is None:
            torch.bmm(xg, wt, out=yk).mul_(scale)
        else:
            bg = bias.reshape(nb, bs).index_select(0, blocks).view(g, 1, ko)
            bg = bg if dtype is None else bg.to(dtype)
            torch.baddbmm(bg, xg, wt, beta=scale, alpha=scale, out=yk)
        # dropped output blocks are zeros; the extra block-row takes the padding
        y = yk.new_zeros(rows * nb + 1, bs)
        y.index_copy_(0, gather if scatter is None else scatter, yk.view(-1, bs))
        y = y[: rows * nb].view(rows, op)
        ctx.save_for_backward(x, weight, blocks, row_src, gather, real_pos, row_valid)
        ctx.meta = (g, n, bs, scale, dtype, ws)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # backward reuses the gathered blocks if nothing took the buffers in between
        ctx.reuse = None
        if ws is not None and dtype is None:
            ctx.reuse = (wg, xg, ws.stamp("w"), ws.stamp("x"))
        return y

    @staticmethod
    def _gather(
        x: Tensor,
        weight: Tensor,
        blocks: Tensor,
        row_src: Tensor | None,
        g: int,
        n: int,
        ko: int,
        bs: int,
        dtype: torch.dtype | None,
        ws: _Workspace | None,
    ) -> tuple[Tensor, Tensor]:
        fin = x.shape[1]
        # the kept output blocks of W are contiguous rows: (G*kb, bs*I) = (G, ko, I)
        wg = _gather_rows(weight.reshape(-1, bs * fin), blocks, (g, ko, fin), ws, "w")
        if row_src is None:
            xg = x.view(g, n, fin)
        else:
            xg = _gather_rows(x, row_src, (g, n, fin), ws, "x")
        if dtype is not None:
            wg, xg = wg.to(dtype), xg.to(dtype)
        return wg, xg

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            ctx.reuse = None
            return _OutputPrunedLinear._differentiable_backward(ctx, dy) + (None,) * 12
        x, weight, blocks, row_src, gather, real_pos, row_valid = ctx.saved_tensors
        g, n, bs, scale, dtype, ws = ctx.meta
        rows, fin = x.shape
        op = weight.shape[0]
        nb, ko = op // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with _autocast_off(dy):
            reuse, ctx.reuse = ctx.reuse, None
            if reuse is not None and ws.unchanged(reuse[2]) and ws.unchanged(reuse[3]):
                wg, xg = reuse[0], reuse[1]
            else:
                wg, xg = _OutputPrunedLinear._gather(
                    x, weight, blocks, row_src, g, n, ko, bs, dtype, ws
                )
            dy = dy.to(wg.dtype)
            dyk = _gather_rows(dy.reshape(rows * nb, bs), gather, (g, n, ko), ws, "y")
            if row_valid is not None:
                dyk.mul_(row_valid.to(dyk.dtype))  # padding rows add nothing
            dyk.mul_(scale)
            if need_b:
                dbk = dyk.sum(1).view(-1, bs)  # (G*kb, bs)
                db = dy.new_zeros(nb, bs).index_add_(0, blocks, dbk).view(op).to(b_dtype)
            if need_x:
                dx = torch.bmm(dyk, wg).view(g * n, fin)  # (G*n, I), dense
                if real_pos is not None:
                    dx = dx.index_select(0, real_pos)
                dx = dx.to(x_dtype)
            if need_w:
                # kept rows only, into W's gathered blocks (no longer needed)
                dwk = wg
                if ws is not None:
                    ws.take("w", (g, ko, fin), wg)  # it is overwritten: restamp it
                torch.bmm(dyk.transpose(1, 2), xg, out=dwk)  # (G, ko, I)
                dw = dy.new_zeros(nb, bs * fin).index_add_(0, blocks, dwk.view(-1, bs * fin))
                dw = dw.view(op, fin).to(w_dtype)
        return (dx, dw, db) + (None,) * 12

    @staticmethod
    def _differentiable_backward(
        ctx: Any, dy: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dW, db)`` with differentiable out-of-place ops only, on the kept
        blocks only (see :meth:`_InputPrunedLinear._differentiable_backward`)."""
        x, weight, blocks, row_src, gather, real_pos, row_valid = ctx.saved_tensors
        g, n, bs, scale, dtype, _ = ctx.meta
        rows, fin = x.shape
        op = weight.shape[0]
        nb, ko = op // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with _autocast_off(dy):
            wg = weight.reshape(-1, bs * fin).index_select(0, blocks).view(g, ko, fin)
            if dtype is not None:
                wg = wg.to(dtype)
            dy = dy.to(wg.dtype)
            dyk = dy.reshape(rows * nb, bs).index_select(0, gather).view(g, n, ko)
            if row_valid is not None:
                dyk = dyk * row_valid.to(dyk.dtype)  # padding rows add nothing
            dyk = dyk * scale
            if need_b:
                dbk = dyk.sum(1).reshape(-1, bs)  # (G*kb, bs)
                db = dy.new_zeros(nb, bs).index_add(0, blocks, dbk).view(op).to(b_dtype)
            if need_x:
                dx = torch.bmm(dyk, wg).view(g * n, fin)  # (G*n, I), dense
                if real_pos is not None:
                    dx = dx.index_select(0, real_pos)
                dx = dx.to(x_dtype)
            if need_w:
                xg = x.view(g, n, fin) if row_src is None else x.index_select(0, row_src)
                xg = xg.view(g, n, fin)
                xg = xg if dtype is None else xg.to(dtype)
                dwk = torch.bmm(dyk.transpose(1, 2), xg)  # (G, ko, I)
                dw = dy.new_zeros(nb, bs * fin).index_add(0, blocks, dwk.reshape(-1, bs * fin))
                dw = dw.view(op, fin).to(w_dtype)
        return dx, dw, db


# --------------------------------------------------------------------------------------
# The module.


class BlockGyroLinear(ScheduledModule):
    """A Linear layer with block-wise gyro dropout fused in, computing only kept blocks.

    ``prune="input"`` is ``nn.Linear(nn.Dropout(p)(x))`` and ``prune="output"`` is
    ``nn.Dropout(p)(nn.Linear(x))``, with gyro-scheduled block masks instead of fresh
    element masks: the ``num_subnets`` (sigma) subnetworks each drop exactly
    ``round(p * n_blocks)`` of the ``n_blocks = ceil(features / block_size)`` blocks of
    adjacent features; ``subnets_per_step`` (tau) of them are active at a time, one per
    contiguous row group of the batch, and a set stays active for ``steps_per_set``
    steps (the same schedule, seeding, state and step rules as
    :class:`~gyrodrop.GyroDropout`). See the module docstring for how the GEMMs are
    pruned and for the memory layout.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        p: drop probability of each block, in ``[0, 1)``. The realized rate is
            :attr:`effective_p` ``= round(p * n_blocks) / n_blocks``, and kept values are
            scaled by ``1 / (1 - effective_p)``.
        num_subnets: sigma, the number of pre-selected subnetworks.
        subnets_per_step: tau, subnetworks trained at once (one per row group). The
            pruned GEMMs pay when each group has many rows (the paper uses 128 rows per
            group: batch 256, tau 2); with few rows per group the gathered weights
            (``tau * (1 - p)`` copies of ``W``'s kept blocks) dominate.
        block_size: adjacent features dropped together (32 in the paper: 128 bytes).
        total_steps: the run's number of steps; sets
            ``steps_per_set = max(1, total_steps * tau // sigma)``.
        steps_per_set: steps each set stays active (instead of ``total_steps``).
            With neither, 1 and a warning.
        schedule: ``"consecutive"`` (the paper's) or ``"random"`` (a fresh set per step).
        seed: seeds the masks (and the schedule unless ``schedule_seed`` is given); a
            buffer, so it is checkpointed.
        auto_step: ``True``: the step advances by itself, once per training step (per
            training forward of the model after :func:`gyrodrop.apply_block_gyro`, per
            call for a layer on its own; see :class:`~gyrodrop.GyroDropout`).
            ``False``: call :func:`gyrodrop.step` after each optimizer step.
        prune: ``"input"`` (dropout before the Linear) or ``"output"`` (after it).
        backend: who runs the pruned GEMMs. ``"torch"``: gathers of the kept blocks
            and batched GEMMs (any device and dtype). ``"triton"``: Triton kernels that
            read the kept blocks in place (:mod:`gyrodrop.blockwise_triton`; CUDA,
            float16/bfloat16/float32; on CPU tensors only under
            ``TRITON_INTERPRET=1``, Triton's slow interpreter, else a ``RuntimeError``).
            ``"auto"`` (default): ``"triton"`` for CUDA inputs of those dtypes when
            triton is installed and the forward is not being compiled, else
            ``"torch"``. Both compute the same function up to float rounding.
        schedule_seed: seeds the order in which subnetworks become active (default:
            ``seed``); layers sharing it train the same network-level subnetworks
            together (:func:`gyrodrop.apply_block_gyro` shares it across layers).
        device: of the parameters, as for :class:`torch.nn.Linear`.
        dtype: of the parameters, as for :class:`torch.nn.Linear`.

    Shape: input ``(B, *, in_features)``, output ``(B, *, out_features)``. Row groups
    are formed over dim 0 (samples); the middle dims of a sample share its mask (as
    ``GyroDropout(dims=(-1,))`` on ``(B, T, F)`` sequences). Under
    ``torch.distributed`` the groups span the global batch, as for ``GyroDropout``.
    ``eval()``: a plain ``F.linear``.

    Memory: besides the parameters, each layer keeps scratch buffers between training
    steps (the kept blocks of ``W`` for all groups, about ``tau * (1 - p)`` times the
    weight, and of one batch of activations), so that no step pays page faults for them.

    Example:
        >>> import torch, gyrodrop
        >>> layer = gyrodrop.BlockGyroLinear(
        ...     64, 8, p=0.5, num_subnets=16, block_size=16, steps_per_set=10
        ... )
        >>> layer.n_blocks, layer.n_dropped, layer.effective_p
        (4, 2, 0.5)
        >>> mask = layer.dense_mask(6)  # the masks of the next forward
        >>> x = torch.randn(6, 64)
        >>> ref = torch.nn.functional.linear(x * mask, layer.weight, layer.bias)
        >>> torch.allclose(layer(x), ref, atol=1e-5)
        True
        >>> sorted(set(mask.flatten().tolist()))  # kept values are scaled by 1/(1-p)
        [0.0, 2.0]
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        p: float = 0.5,
        num_subnets: int = 256,
        subnets_per_step: int = 2,
        block_size: int = 32,
        total_steps: int | None = None,
        steps_per_set: int | None = None,
        schedule: Schedule = "consecutive",
        seed: int = 0,
        auto_step: bool = True,
        prune: Prune = "input",
        schedule_seed: int | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = type(self).__name__
        check_int(owner, "in_features", in_features, 1)
        check_int(owner, "out_features", out_features, 1)
        check_bool(owner, "bias", bias)
        p = check_p(owner, p)
        check_int(owner, "block_size", block_size, 1)
        check_choice(owner, "prune", prune, PRUNE_MODES)
        check_choice(owner, "backend", backend, BACKENDS)
        if backend == "triton" and not blockwise_triton.is_available():
            raise ValueError(
                f"{owner}: backend='triton' needs the triton package "
                "(pip install 'gyrodrop[triton]'); use backend='auto' or 'torch'"
            )
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
        self.in_features = in_features
        self.out_features = out_features
        self.p = p
        self.block_size = block_size
        self.prune = prune
        self.backend = backend
        features = in_features if prune == "input" else out_features
        self.n_blocks = -(-features // block_size)
        self.n_dropped = n_dropped_blocks(p, self.n_blocks)
        if self.n_dropped >= self.n_blocks:
            raise ValueError(
                f"{owner}: p={p} would drop all {self.n_blocks} blocks of the {features} "
                f"{prune} features (block_size={block_size}); lower p or block_size"
            )
        if p > 0 and self.n_dropped == 0:
            warnings.warn(
                f"{owner}: p={p} rounds to 0 of {self.n_blocks} blocks "
                f"(block_size={block_size}): the layer is a plain Linear; "
                "lower block_size or raise p",
                UserWarning,
                stacklevel=2,
            )
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()
            if device is not None:
                self._buffers_to(self.weight.device)
        # Derived state (never in state_dict): the kept blocks of the active set and
        # the gather/scatter indices for the current batch layout.
        self._plan_key: tuple[Any, ...] | None = None
        self._plan_kept: Tensor | None = None  # the kept blocks self._plan was built for
        self._plan: _Plan | TritonPlan | None = None
        self._workspace = _Workspace()

    # -- construction ------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Initialize ``weight`` and ``bias`` as :class:`torch.nn.Linear` does."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> BlockGyroLinear:
        """A ``BlockGyroLinear`` that keeps ``linear``'s weights: the same
        :class:`~torch.nn.Parameter` objects (so an optimizer built before the swap
        keeps training them), on their device and in their dtype. ``kwargs`` are the
        keyword arguments of the constructor (``p``, ``num_subnets``, ``prune``, ...).

        >>> import torch.nn as nn, gyrodrop
        >>> lin = nn.Linear(64, 10)
        >>> layer = gyrodrop.BlockGyroLinear.from_linear(lin, p=0.25, steps_per_set=5)
        >>> layer.weight is lin.weight
        True
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}"
            )
        for name in ("bias", "device", "dtype"):
            if name in kwargs:
                raise ValueError(
                    f"{cls.__name__}.from_linear: {name} comes from the Linear; do not pass it"
                )
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",  # no initialization: the Linear's parameters are reused
            dtype=linear.weight.dtype,
            **kwargs,  # type: ignore[arg-type]
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module._buffers_to(linear.weight.device)
        module.train(linear.training)
        return module

    def _buffers_to(self, device: torch.device) -> None:
        """Move this module's own buffers (step, seeds) to ``device``."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = buf.to(device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, p={self.p}, prune={self.prune}, "
            f"block_size={self.block_size}, n_blocks={self.n_blocks}, "
            f"n_dropped={self.n_dropped}, num_subnets={self.num_subnets}, "
            f"subnets_per_step={self.subnets_per_step}, "
            f"steps_per_set={self.steps_per_set}, schedule={self.schedule}, "
            f"backend={self.backend}"
        )

    # -- masks -------------------------------------------------------------------------

    @property
    def features(self) -> int:
        """The number of features the mask spans (input or output, per ``prune``)."""
        return self.in_features if self.prune == "input" else self.out_features

    @property
    def mask_side(self) -> Literal["input", "output"]:
        """Where the masks apply: the ``"input"`` features or the ``"output"`` ones
        (``prune``)."""
        return self.prune

    @property
    def effective_p(self) -> float:
        """The realized drop rate, ``n_dropped / n_blocks`` (the scaling uses it)."""
        return self.n_dropped / self.n_blocks

    @property
    def scale(self) -> float:
        """The factor applied to kept values, ``1 / (1 - effective_p)``."""
        return 1.0 / (1.0 - self.effective_p)

    def hparams(self) -> dict[str, Any]:
        """Sigma, tau, ``steps_per_set``, schedule, ``p``, ``block_size`` and ``prune``."""
        return {
            **super().hparams(),
            "p": self.p,
            "block_size": self.block_size,
            "prune": self.prune,
        }

    def block_masks(self, step: int | None = None, device: torch.device | None = None) -> Tensor:
        """Keep masks over blocks of the set active at ``step`` (default: the current
        step), bool, shape ``(subnets_per_step, n_blocks)``; each row drops exactly
        :attr:`n_dropped` blocks."""
        step = self.current_step() if step is None else step
        active = self.subnet_schedule.at_step(self.current_schedule_seed(), step)
        return masks.block_keep_mask(
            self.current_seed(), active, self.n_blocks, self.n_dropped, device=device
        )

    def group_masks(
        self,
        step: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """Scaled feature masks of the active set, shape ``(subnets_per_step, features)``:
        ``1 / (1 - effective_p)`` on kept features, 0 on dropped ones."""
        keep = self.block_masks(step, device=device)
        keep = keep.repeat_interleave(self.block_size, dim=1)[:, : self.features]
        return keep.to(dtype) * self.scale

    def subnet_mask(self, k: int, like: Tensor | None = None) -> Tensor:
        """The scaled feature mask of subnetwork ``k``, shape ``(features,)``, in
        ``like``'s dtype and device (float32 on the CPU without ``like``); used by
        subnetwork ensembles (:func:`gyrodrop.subnet_ensemble_predict`)."""
        check_int(type(self).__name__, "k", k, 0, self.num_subnets - 1)
        device = None if like is None else like.device
        ids = torch.tensor([k], dtype=torch.int64)
        keep = masks.block_keep_mask(
            self.current_seed(), ids, self.n_blocks, self.n_dropped, device=device
        )[0]
        keep = keep.repeat_interleave(self.block_size)[: self.features]
        return keep.to(torch.float32 if like is None else like.dtype) * self.scale

    def dense_mask(
        self,
        batch: int,
        step: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """The scaled mask of every row of a local batch of ``batch`` samples at ``step``
        (default: the current one, i.e. the next training forward), shape
        ``(batch, features)``. The training forward equals
        ``F.linear(x * dense_mask(B)[:, None, ..., :], W, b)`` (``prune="input"``) or
        ``F.linear(x, W, b) * dense_mask(B)[...]`` (``prune="output"``)."""
        check_int(type(self).__name__, "batch", batch, 0)
        counts = self.group_counts(batch)
        group = self.group_masks(step, dtype=dtype, device=device)
        rows = torch.repeat_interleave(
            torch.arange(len(counts), device=group.device),
            torch.tensor(counts, device=group.device),
        )
        return group[rows]

    # -- the fused forward -------------------------------------------------------------

    def _kept_blocks(self, device: torch.device, step: int) -> Tensor:
        """Sorted kept block ids of the set active at ``step``,
        ``(tau, n_blocks - n_dropped)``; cached until the set changes."""

        def build(seed: int, active: Tensor) -> Tensor:
            keep = masks.block_keep_mask(seed, active, self.n_blocks, self.n_dropped, device=device)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            return order[:, : self.n_blocks - self.n_dropped].contiguous()

        kept: Tensor = self.for_active_set(step, device, build)
        return kept

    def _use_triton(self, x: Tensor) -> bool:
        """Whether this forward runs the Triton kernels (see ``backend``)."""
        if self.backend != "auto":
            return self.backend == "triton"
        return (
            x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling()
            and blockwise_triton.is_available()
        )

    @torch.compiler.disable
    def _prepare(self, x: Tensor, use_triton: bool = False) -> _Plan | TritonPlan | None:
        """The plan of this training forward (``None``: compute a plain Linear; a
        :class:`~gyrodrop.blockwise_triton.TritonPlan` with ``use_triton``), at the step
        :meth:`forward_step` gives (which may advance it)."""
        plan = None
        batch = x.shape[0]
        step = self.forward_step()
        if self.n_dropped > 0 and x.numel() > 0:
            kept = self._kept_blocks(x.device, step)
            counts = self.group_counts(batch)
            rows_per_sample = x.numel() // (batch * self.in_features)
            key = (tuple(counts), rows_per_sample, use_triton)
            if key != self._plan_key or self._plan is None or self._plan_kept is not kept:
                if use_triton:
                    self._plan = blockwise_triton.build_plan(
                        kept,
                        counts,
                        rows_per_sample,
                        n_blocks=self.n_blocks,
                        block_size=self.block_size,
                        features=self.features,
                        scale=self.scale,
                    )
                else:
                    out = self.out_features if self.prune == "input" else None
                    self._plan = _build_plan(kept, counts, rows_per_sample, self.n_blocks, out)
                self._plan_key = key
                self._plan_kept = kept
            plan = self._plan
        return plan

    def forward(self, x: Tensor) -> Tensor:
        owner = type(self).__name__
        check_input(owner, x, rows=self.training)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{owner}: expected input (B, *, {self.in_features}), got shape {tuple(x.shape)}"
            )
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        if x.dim() < 2:
            raise ValueError(
                f"{owner}: training needs a batch dim, input (B, *, {self.in_features}), "
                f"got shape {tuple(x.shape)}; hint: x.unsqueeze(0)"
            )
        if x.is_meta or self.weight.is_meta:
            # Shapes only (as nn.Linear on the meta device): no masks, no step.
            return F.linear(x, self.weight, self.bias)
        plan = self._prepare(x, self._use_triton(x))
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        return self._pruned(x, plan)

    def _pruned(self, x: Tensor, plan: _Plan | TritonPlan) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (R, I): samples' rows are consecutive
        if isinstance(plan, TritonPlan):  # the Triton backend: no padding, no workspace
            y = blockwise_triton.pruned_linear(
                x2, self.weight, self.bias, plan, self.prune, _compute_dtype(x)
            )
            return y.reshape(*lead, self.out_features)
        bs, width = self.block_size, self.n_blocks * self.block_size
        dtype = _compute_dtype(x)
        ws = None if torch.compiler.is_compiling() else self._workspace
        weight, bias = self.weight, self.bias
        if self.prune == "input":
            pad = width - self.in_features
            if pad:  # a shorter last block: work on zero-padded features
                x2, weight = F.pad(x2, (0, pad)), F.pad(weight, (0, pad))
            y = _InputPrunedLinear.apply(
                x2,
                weight,
                bias,
                plan.blocks,
                plan.gather,
                plan.scatter,
                plan.real_pos,
                plan.w_rows,
                plan.groups,
                plan.rows_per_group,
                bs,
                self.scale,
                dtype,
                ws,
            )
        else:
            pad = width - self.out_features
            if pad:
                weight = F.pad(weight, (0, 0, 0, pad))
                bias = None if bias is None else F.pad(bias, (0, pad))
            y = _OutputPrunedLinear.apply(
                x2,
                weight,
                bias,
                plan.blocks,
                plan.row_src,
                plan.gather,
                plan.scatter,
                plan.real_pos,
                plan.row_valid,
                plan.groups,
                plan.rows_per_group,
                bs,
                self.scale,
                dtype,
                ws,
            )
            if pad:
                y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)


# --------------------------------------------------------------------------------------
# Finding Dropout -> Linear (and Linear -> Dropout) in a model, for apply_block_gyro.

#: ``prune`` of the surgery: a side, or ``"auto"`` (what each site allows).
SurgeryPrune = Literal["input", "output", "auto"]
SURGERY_PRUNE: tuple[SurgeryPrune, ...] = ("input", "output", "auto")

# Activations that commute with a non-negative scaled mask: f(c * y) = c * f(y) for c >= 0,
# so ``Dropout(f(Linear(x)))`` equals ``f(Dropout(Linear(x)))`` with the same mask.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu)
_FUNCTIONAL_DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)


@dataclass(frozen=True)
class BlockSite:
    """A place where block-wise dropout can be fused: the ``nn.Dropout`` at
    ``dropout`` (qualified module name) becomes ``nn.Identity`` and the ``nn.Linear``
    at ``linear`` becomes a :class:`BlockGyroLinear` with ``prune`` (``"input"``:
    Dropout -> Linear; ``"output"``: Linear [-> ReLU-like] -> Dropout)."""

    dropout: str
    linear: str
    prune: str


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps gyrodrop modules whole (their forward reads buffers)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SteppedModule) or super().is_leaf_module(m, module_qualified_name)


def _module_uses(model: nn.Module) -> dict[int, int]:
    """How many names each module instance has in ``model`` (shared modules > 1)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


@dataclass
class _Candidate:
    """One ``nn.Dropout`` and the Linear it could be fused with on each side
    (``None``, with a reason, where it cannot)."""

    dropout: str
    after: str | None  # the Linear it feeds (input fusion)
    before: str | None  # the Linear feeding it (output fusion)
    why_not_after: str
    why_not_before: str
    blocked: str | None = None  # a reason that rules out both


def find_block_sites(
    model: nn.Module, prune: SurgeryPrune = "input"
) -> tuple[list[BlockSite], list[str]]:
    """The fusable ``nn.Dropout``/``nn.Linear`` pairs of ``model`` and, for every other
    ``nn.Dropout`` (or functional dropout call), why it cannot be fused.

    The dataflow comes from ``torch.fx`` symbolic tracing (any model it can trace:
    nested containers, custom modules, functional code between layers). Where tracing
    fails, only ``nn.Sequential`` containers are searched (their order is their
    dataflow) and the first reason says so.

    ``prune``: ``"input"`` fuses ``Dropout -> Linear``; ``"output"`` fuses
    ``Linear [-> ReLU/LeakyReLU/PReLU] -> Dropout`` (these activations commute with a
    non-negative mask); ``"auto"`` picks a side for every dropout so that the pruned
    GEMM work (``in * out`` of the fused Linears) is largest, ties going to input
    fusion. For an MLP ``Linear(784, 2048) -> ReLU -> Dropout -> Linear(2048, 2048) ->
    ReLU -> Dropout -> Linear(2048, 10)`` that is output fusion twice (the two large
    Linears) where input fusion would prune the large and the small one.

    A pair is fused only when both modules are registered and called once, and the
    dropout's output goes only to that Linear (input fusion) or the Linear's output
    reaches only the dropout (output fusion), so that swapping both in place changes
    nothing else.
    """
    check_choice("find_block_sites", "prune", prune, SURGERY_PRUNE)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to Sequential
        candidates, problems = _sequential_candidates(model)
        problems.insert(
            0,
            f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); only "
            "nn.Sequential containers were searched",
        )
    else:
        candidates, problems = _graph_candidates(model, graph)
    weights = {
        name: m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    sites, unresolved = _resolve(candidates, prune, weights)
    return sites, problems + unresolved


def _resolve(
    candidates: list[_Candidate], prune: str, weights: dict[str, int]
) -> tuple[list[BlockSite], list[str]]:
    """Assign Linears to dropouts, each Linear at most once.

    ``"input"`` / ``"output"``: every dropout takes the Linear on that side.
    ``"auto"``: the assignment that prunes the most GEMM work, ``weights[linear]``
    (``in * out``) summed over the fused Linears, ties going to input fusion. A Linear
    can be wanted by two dropouts only (the one feeding it, the one it feeds), so the
    conflicts form chains ``D1 -> L -> D2 -> L' -> D3 ...``, solved exactly by dynamic
    programming along each chain.
    """
    chosen: dict[str, BlockSite] = {}
    live = [c for c in candidates if not c.blocked]
    if prune in ("input", "output"):
        for c in live:
            linear = c.after if prune == "input" else c.before
            if linear is not None:
                chosen[c.dropout] = BlockSite(c.dropout, linear, prune)
    else:
        fed_by = {c.before: c for c in live if c.before is not None}  # Linear -> dropout
        follower = {c.dropout: fed_by.get(c.after) for c in live if c.after is not None}
        has_prev = {d.dropout for d in follower.values() if d is not None}
        for start in live:
            if start.dropout in has_prev:
                continue
            chain = [start]
            while (nxt := follower.get(chain[-1].dropout)) is not None:
                chain.append(nxt)
            for c, side in zip(chain, _best_chain(chain, weights), strict=True):
                if side is not None:
                    linear = c.after if side == "input" else c.before
                    assert linear is not None
                    chosen[c.dropout] = BlockSite(c.dropout, linear, side)
    sites = [chosen[c.dropout] for c in candidates if c.dropout in chosen]
    problems = []
    for c in candidates:
        if c.dropout in chosen:
            continue
        if c.blocked:
            problems.append(f"{c.dropout}: {c.blocked}")
            continue
        reasons = []
        if prune in ("input", "auto"):
            reasons.append(c.why_not_after if c.after is None else f"{c.after} is fused already")
        if prune in ("output", "auto"):
            reasons.append(c.why_not_before if c.before is None else f"{c.before} is fused already")
        hint = ""
        if prune == "input" and c.before is not None:
            hint = "; prune='auto' or 'output' would fuse it into the Linear before it"
        problems.append(f"{c.dropout}: " + "; ".join(reasons) + hint)
    return sites, problems


def _best_chain(chain: list[_Candidate], weights: dict[str, int]) -> list[str | None]:
    """The side (``"input"``, ``"output"`` or ``None``) of each dropout of a chain in
    which dropout ``i``'s Linear after it is dropout ``i + 1``'s Linear before it, that
    maximizes (pruned work, number of input fusions)."""
    Score = tuple[int, int]
    # best[t]: (score, sides) over the dropouts so far, t = the last one took its 'after'
    best: dict[bool, tuple[Score, list[str | None]]] = {False: ((0, 0), [])}
    for c in chain:
        nxt: dict[bool, tuple[Score, list[str | None]]] = {}
        for took_after, (score, sides) in best.items():
            options: list[tuple[str | None, Score]] = [(None, (0, 0))]
            if c.after is not None:
                options.append(("input", (weights.get(c.after, 0), 1)))
            if c.before is not None and not took_after:  # shared with the previous 'after'
                options.append(("output", (weights.get(c.before, 0), 0)))
            for side, (w, n_in) in options:
                total = (score[0] + w, score[1] + n_in)
                key = side == "input"
                if key not in nxt or total > nxt[key][0]:
                    nxt[key] = (total, [*sides, side])
        best = nxt
    return max(best.values(), key=lambda v: v[0])[1]


def _graph_candidates(
    model: nn.Module, graph: torch.fx.Graph
) -> tuple[list[_Candidate], list[str]]:
    modules = dict(model.named_modules())
    uses = _module_uses(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    def is_module(node: object, kinds: tuple[type, ...]) -> bool:
        if not isinstance(node, torch.fx.Node) or node.op != "call_module":
            return False
        return type(modules.get(str(node.target))) in kinds

    def once(node: torch.fx.Node) -> bool:
        name = str(node.target)
        return calls.get(name, 0) == 1 and uses[id(modules[name])] == 1

    def homogeneous(node: torch.fx.Node) -> bool:
        return (
            is_module(node, _HOMOGENEOUS_MODULES)
            or (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        )

    candidates: list[_Candidate] = []
    problems: list[str] = []
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT) or (
            node.op == "call_method" and node.target == "dropout"
        ):
            problems.append(f"{node.name}: a functional dropout call cannot be swapped in place")
            continue
        if not is_module(node, (nn.Dropout,)):
            continue
        c = _Candidate(str(node.target), None, None, "", "")
        candidates.append(c)
        if not once(node):
            c.blocked = "the Dropout is registered or called more than once"
            continue
        # input side: the dropout's only consumer is a Linear called once
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        if nxt is None:
            c.why_not_after = f"its output has {len(users)} consumers"
        elif not (is_module(nxt, (nn.Linear,)) and nxt.args[:1] == (node,)):
            what = nxt.target if nxt.op == "call_module" else nxt.name
            c.why_not_after = f"followed by {what}, not an nn.Linear"
        elif not once(nxt):
            c.why_not_after = f"the Linear after it ({nxt.target}) is called more than once"
        else:
            c.after = str(nxt.target)
        # output side: back through ReLU-like activations to a Linear that feeds only it
        prev = node.args[0] if node.args else None
        while isinstance(prev, torch.fx.Node) and homogeneous(prev) and len(prev.users) == 1:
            prev = prev.args[0] if prev.args else None
        if not (isinstance(prev, torch.fx.Node) and is_module(prev, (nn.Linear,))):
            c.why_not_before = "no nn.Linear before it (through ReLU-like activations only)"
        elif len(prev.users) != 1 or not once(prev):
            c.why_not_before = f"the Linear before it ({prev.target}) is used elsewhere too"
        else:
            c.before = str(prev.target)
    return candidates, problems


def _sequential_candidates(model: nn.Module) -> tuple[list[_Candidate], list[str]]:
    uses = _module_uses(model)
    candidates: list[_Candidate] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = [f"{seq_name}.{k}" if seq_name else k for k in seq._modules]
        children = list(seq._modules.values())
        for i, child in enumerate(children):
            if type(child) is not nn.Dropout:
                continue
            c = _Candidate(names[i], None, None, "", "")
            candidates.append(c)
            if uses[id(child)] != 1:
                c.blocked = "the Dropout is registered more than once"
                continue
            nxt = children[i + 1] if i + 1 < len(children) else None
            if type(nxt) is not nn.Linear:
                c.why_not_after = "not followed by an nn.Linear in its Sequential"
            elif uses[id(nxt)] != 1:
                c.why_not_after = f"the Linear after it ({names[i + 1]}) is shared"
            else:
                c.after = names[i + 1]
            j = i - 1
            while j >= 0 and type(children[j]) in _HOMOGENEOUS_MODULES:
                j -= 1
            if j < 0 or type(children[j]) is not nn.Linear:
                c.why_not_before = "no nn.Linear before it in its Sequential"
            elif uses[id(children[j])] != 1:
                c.why_not_before = f"the Linear before it ({names[j]}) is shared"
            else:
                c.before = names[j]
    return candidates, []
