"""The torch kernels of :class:`~gyrodrop.BlockGyroLinear`: pruned GEMMs as autograd
Functions, called through :func:`pruned_linear` with one plan.

``prune="input"`` (:class:`InputPrunedLinear`) and ``prune="output"``
(:class:`OutputPrunedLinear`) gather the kept blocks of ``W`` and of the activation
(into :class:`~gyrodrop.blockwise.workspace.Workspace` buffers when the layer has
one) and run batched GEMMs on them, in forward, input gradient and weight gradient;
double backward goes through a differentiable path. The GEMMs run in the autocast
dtype when autocast is on, like ``F.linear``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import Tensor

from gyrodrop.blockwise.plan import Plan
from gyrodrop.blockwise.workspace import Workspace, gather_rows, scratch

__all__ = [
    "InputPrunedLinear",
    "OutputPrunedLinear",
    "pruned_linear",
    "pruned_linear_traced",
    "compute_dtype",
    "autocast_off",
]


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def compute_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device, or ``None`` when autocast is off or does
    not apply (autocast casts float32 and lower, never float64)."""
    device_type = x.device.type
    if not autocast_enabled(device_type) or not x.is_floating_point():
        return None
    if x.dtype == torch.float64:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype()
        return torch.get_autocast_gpu_dtype()


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for the GEMMs (their operands are already in the compute dtype);
    a no-op context when autocast is off anyway (building one costs microseconds)."""
    if autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Input pruning: block dropout on the Linear's input, fused into the GEMMs.


class InputPrunedLinear(torch.autograd.Function):
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
        ws: Workspace | None,
    ) -> Tensor:
        out = weight.shape[0]
        g, n, bs = groups, rows_per_group, block_size
        k = blocks.numel() // g * bs
        wg, xk = InputPrunedLinear._gather(x, weight, gather, w_rows, g, n, k, bs, dtype, ws)
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
        ws: Workspace | None,
    ) -> tuple[Tensor, Tensor]:
        out = weight.shape[0]
        # the kept input blocks of W for every group: 128-byte block slices gathered
        # as rows (memcpy-like): (O*G*kb, bs) = (O, G, k)
        wg = gather_rows(weight.reshape(-1, bs), w_rows, (out, g, k), ws, "w")
        # the kept blocks of every row of x, batched by group: (G, n, k)
        xk = gather_rows(x.reshape(-1, bs), gather, (g, n, k), ws, "x")
        if dtype is not None:
            wg, xk = wg.to(dtype), xk.to(dtype)
        return wg, xk

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            ctx.reuse = None
            return InputPrunedLinear._differentiable_backward(ctx, dy) + (None,) * 11
        x, weight, blocks, gather, scatter, real_pos, w_rows = ctx.saved_tensors
        g, n, bs, scale, dtype, ws = ctx.meta
        rows, fp = x.shape
        out = weight.shape[0]
        nb, k = fp // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with autocast_off(dy):
            if need_b:
                db = dy.sum(0).to(b_dtype)
            reuse, ctx.reuse = ctx.reuse, None
            if reuse is not None and ws.unchanged(reuse[2]) and ws.unchanged(reuse[3]):
                wg, xk = reuse[0], reuse[1]  # xk is scaled already
            else:
                wg, xk = InputPrunedLinear._gather(
                    x, weight, gather, w_rows, g, n, k, bs, dtype, ws
                )
                xk.mul_(scale)
            dy = dy.to(wg.dtype)
            if real_pos is None:
                dyk = dy.reshape(g, n, out)
            else:  # padding rows get a zero gradient, so they add nothing to dW
                dyk = dy.new_zeros(g * n, out).index_copy_(0, real_pos, dy).view(g, n, out)
            if need_x:
                dxk = scratch(ws, "dx", (g, n, k), dy)
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
        with autocast_off(dy):
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


class OutputPrunedLinear(torch.autograd.Function):
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
        ws: Workspace | None,
    ) -> Tensor:
        rows, fin = x.shape
        op = weight.shape[0]
        g, n, bs = groups, rows_per_group, block_size
        nb, ko = op // bs, blocks.numel() // g * bs
        wg, xg = OutputPrunedLinear._gather(x, weight, blocks, row_src, g, n, ko, bs, dtype, ws)
        wt = wg.transpose(1, 2)  # (G, I, ko): a transposed view, no copy
        yk = scratch(ws, "y", (g, n, ko), wg)
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
        ws: Workspace | None,
    ) -> tuple[Tensor, Tensor]:
        fin = x.shape[1]
        # the kept output blocks of W are contiguous rows: (G*kb, bs*I) = (G, ko, I)
        wg = gather_rows(weight.reshape(-1, bs * fin), blocks, (g, ko, fin), ws, "w")
        xg = x.view(g, n, fin) if row_src is None else gather_rows(x, row_src, (g, n, fin), ws, "x")
        if dtype is not None:
            wg, xg = wg.to(dtype), xg.to(dtype)
        return wg, xg

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            ctx.reuse = None
            return OutputPrunedLinear._differentiable_backward(ctx, dy) + (None,) * 12
        x, weight, blocks, row_src, gather, real_pos, row_valid = ctx.saved_tensors
        g, n, bs, scale, dtype, ws = ctx.meta
        rows, fin = x.shape
        op = weight.shape[0]
        nb, ko = op // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with autocast_off(dy):
            reuse, ctx.reuse = ctx.reuse, None
            if reuse is not None and ws.unchanged(reuse[2]) and ws.unchanged(reuse[3]):
                wg, xg = reuse[0], reuse[1]
            else:
                wg, xg = OutputPrunedLinear._gather(
                    x, weight, blocks, row_src, g, n, ko, bs, dtype, ws
                )
            dy = dy.to(wg.dtype)
            dyk = gather_rows(dy.reshape(rows * nb, bs), gather, (g, n, ko), ws, "y")
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
        blocks only (see :meth:`InputPrunedLinear._differentiable_backward`)."""
        x, weight, blocks, row_src, gather, real_pos, row_valid = ctx.saved_tensors
        g, n, bs, scale, dtype, _ = ctx.meta
        rows, fin = x.shape
        op = weight.shape[0]
        nb, ko = op // bs, blocks.numel() // g * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = dw = db = None
        with autocast_off(dy):
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


def pruned_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: Plan,
    *,
    prune: Literal["input", "output"],
    block_size: int,
    scale: float,
    dtype: torch.dtype | None,
    ws: Workspace | None,
) -> Tensor:
    """The pruned ``F.linear`` of ``x`` (``(R, Fp)`` for input pruning, ``(R, I)`` for
    output pruning; ``weight`` padded to whole blocks) on the kept blocks of ``plan``,
    kept values scaled by ``scale``; GEMMs in ``dtype`` (the autocast dtype, or
    ``None``); scratch in ``ws`` (or fresh tensors)."""
    if prune == "input":
        y: Tensor = InputPrunedLinear.apply(
            x,
            weight,
            bias,
            plan.blocks,
            plan.gather,
            plan.scatter,
            plan.real_pos,
            plan.w_rows,
            plan.groups,
            plan.rows_per_group,
            block_size,
            scale,
            dtype,
            ws,
        )
        return y
    y = OutputPrunedLinear.apply(
        x,
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
        block_size,
        scale,
        dtype,
        ws,
    )
    return y


def pruned_linear_traced(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: Plan,
    *,
    prune: Literal["input", "output"],
    block_size: int,
    scale: float,
    dtype: torch.dtype | None,
) -> Tensor:
    """:func:`pruned_linear` written with differentiable out-of-place ops only (gathers,
    batched GEMMs, an ``index_copy``), for ``torch.compile``: the compiler traces it
    and derives the backward, which is pruned too (the gradient of a gather is an
    ``index_add`` into the kept blocks: dropped blocks are never multiplied). No
    workspace (the compiler plans memory). The same function as the autograd kernels
    up to float rounding."""
    g, n, bs = plan.groups, plan.rows_per_group, block_size
    if prune == "input":
        out = weight.shape[0]
        k = plan.kept_blocks * bs
        assert plan.w_rows is not None  # built with out_features for input pruning
        wg = weight.reshape(-1, bs).index_select(0, plan.w_rows).view(out, g, k)
        xk = x.reshape(-1, bs).index_select(0, plan.gather).view(g, n, k)
        if dtype is not None:
            wg, xk = wg.to(dtype), xk.to(dtype)
        with autocast_off(x):
            xk, wt = xk * scale, wg.permute(1, 2, 0)  # (G, n, k), (G, k, O)
            if bias is None:
                yk = torch.bmm(xk, wt)
            else:
                b = (bias if dtype is None else bias.to(dtype)).view(1, 1, out)
                yk = torch.baddbmm(b.expand(g, n, out), xk, wt)
        y = yk.reshape(g * n, out)
        return y if plan.real_pos is None else y.index_select(0, plan.real_pos)
    rows, fin = x.shape
    op = weight.shape[0]
    nb, ko = op // bs, plan.kept_blocks * bs
    wg = weight.reshape(-1, bs * fin).index_select(0, plan.blocks).view(g, ko, fin)
    xg = x if plan.row_src is None else x.index_select(0, plan.row_src)
    xg = xg.reshape(g, n, fin)
    if dtype is not None:
        wg, xg = wg.to(dtype), xg.to(dtype)
    with autocast_off(x):
        wt = wg.transpose(1, 2)  # (G, I, ko)
        if bias is None:
            yk = torch.bmm(xg, wt) * scale  # (G, n, ko)
        else:
            bg = bias.reshape(nb, bs).index_select(0, plan.blocks).view(g, 1, ko)
            bg = bg if dtype is None else bg.to(dtype)
            yk = torch.baddbmm(bg, xg, wt, beta=scale, alpha=scale)
    index = plan.gather if plan.scatter is None else plan.scatter
    y = yk.new_zeros(rows * nb + 1, bs).index_copy(0, index, yk.reshape(-1, bs))
    return y[: rows * nb].view(rows, op)
