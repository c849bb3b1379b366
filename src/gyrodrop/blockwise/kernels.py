"""The torch kernels of :class:`~gyrodrop.BlockGyroLinear`: pruned GEMMs as autograd
Functions, called through :func:`pruned_linear` with one :class:`Call` (the plan and
how to run it).

``prune="input"`` (:class:`InputPrunedLinear`) and ``prune="output"``
(:class:`OutputPrunedLinear`) gather the kept blocks of ``W`` and of the activation
(into :class:`~gyrodrop.blockwise.workspace.Workspace` buffers when the layer has
one) and run batched GEMMs on them, in forward, input gradient and weight gradient.
Each side has one backward formula: it runs on scratch buffers and in place for a
first-order backward, and out of place (so autograd records it) when the backward is
itself differentiated (``create_graph=True``: gradient penalties, double backward).
The GEMMs run in the autocast dtype when autocast is on, like ``F.linear``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from gyrodrop.blockwise.plan import Plan
from gyrodrop.blockwise.workspace import Workspace, gather_rows, scratch

__all__ = [
    "Call",
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


class Call(NamedTuple):
    """One pruned matmul: the ``plan`` (kept blocks and batch layout), the
    ``block_size``, the dropout ``scale`` of kept values, the GEMM ``dtype`` (autocast's,
    or ``None``) and the scratch buffers ``ws`` (``None``: fresh tensors)."""

    plan: Plan
    block_size: int
    scale: float
    dtype: torch.dtype | None
    ws: Workspace | None


class _Ops:
    """The in-place or the out-of-place form of the few ops the formulas use:
    ``graph=True`` (a backward that is itself differentiated) takes no scratch buffer,
    no ``out=`` and writes nothing in place, so autograd can record it; otherwise
    gathers go into the workspace (when there is one) and updates are in place."""

    def __init__(self, graph: bool, ws: Workspace | None) -> None:
        self.graph = graph
        self.ws = None if graph else ws

    def gather(self, src: Tensor, index: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
        """``src.index_select(0, index)`` viewed as ``shape``."""
        if self.graph:
            return src.index_select(0, index).view(shape)
        return gather_rows(src, index, shape, self.ws, name)

    def scaled(self, t: Tensor, scale: float | Tensor) -> Tensor:
        return t * scale if self.graph else t.mul_(scale)

    def bmm(self, a: Tensor, b: Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
        if self.graph:
            return torch.bmm(a, b)
        return torch.bmm(a, b, out=scratch(self.ws, name, shape, a))

    def put(self, base: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
        return base.index_copy(dim, index, src) if self.graph else base.index_copy_(dim, index, src)

    def add(self, base: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
        return base.index_add(dim, index, src) if self.graph else base.index_add_(dim, index, src)


def _reused(ctx: Any, graph: bool) -> tuple[Tensor, Tensor] | None:
    """The forward's gathered blocks of ``W`` and the activation, when a first-order
    backward finds the workspace buffers untouched since (then their contents are the
    forward's)."""
    reuse, ctx.reuse = ctx.reuse, None
    if graph or reuse is None:
        return None
    ws = ctx.call.ws
    if ws.unchanged(reuse[2]) and ws.unchanged(reuse[3]):
        return reuse[0], reuse[1]
    return None


def _remember(ctx: Any, call: Call, a: Tensor, b: Tensor, x: Tensor, weight: Tensor) -> None:
    ctx.save_for_backward(x, weight)
    ctx.call = call
    ctx.bias_dtype = None
    ctx.reuse = None
    if call.ws is not None and call.dtype is None:
        ctx.reuse = (a, b, call.ws.stamp("w"), call.ws.stamp("x"))


# --------------------------------------------------------------------------------------
# Input pruning: block dropout on the Linear's input, fused into the GEMMs.


class InputPrunedLinear(torch.autograd.Function):
    """``y = (x * mask) @ W.T + b`` computed on the kept input blocks only.

    ``x`` is ``(R, Fp)`` and ``weight`` ``(O, Fp)`` with ``Fp = n_blocks * block_size``;
    the scaled mask is implied by the plan's indices and the call's ``scale``. Only
    ``x`` and ``weight`` are saved: backward gathers their kept blocks again (cheaper
    than keeping ``tau * (1 - p)`` copies of ``W`` alive between forward and backward),
    unless the workspace still holds them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, call: Call) -> Tensor:
        plan = call.plan
        out, g, n = weight.shape[0], plan.groups, plan.rows_per_group
        wg, xk = InputPrunedLinear._gather(x, weight, call, _Ops(False, call.ws))
        xk.mul_(call.scale)  # the dropout scaling, applied once to the kept values
        wt = wg.permute(1, 2, 0)  # (G, k, O): a transposed view, no copy
        if bias is None:
            yk = torch.bmm(xk, wt)
        else:
            b = bias if call.dtype is None else bias.to(call.dtype)
            yk = torch.baddbmm(b.view(1, 1, out).expand(g, n, out), xk, wt)
        y = yk.view(g * n, out)  # groups are consecutive rows: already in row order
        if plan.real_pos is not None:
            y = y.index_select(0, plan.real_pos)  # drop the padding rows
        _remember(ctx, call, wg, xk, x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def _gather(x: Tensor, weight: Tensor, call: Call, op: _Ops) -> tuple[Tensor, Tensor]:
        """The kept input blocks of ``W`` for every group, ``(O, G, k)``, and of every row
        of ``x``, batched by group, ``(G, n, k)``: 128-byte block slices gathered as rows
        (memcpy-like)."""
        plan, bs = call.plan, call.block_size
        g, n, k = plan.groups, plan.rows_per_group, plan.kept_blocks * bs
        assert plan.w_rows is not None  # an input plan
        wg = op.gather(weight.reshape(-1, bs), plan.w_rows, (weight.shape[0], g, k), "w")
        xk = op.gather(x.reshape(-1, bs), plan.gather, (g, n, k), "x")
        if call.dtype is not None:
            wg, xk = wg.to(call.dtype), xk.to(call.dtype)
        return wg, xk

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        call: Call = ctx.call
        plan, bs, scale = call.plan, call.block_size, call.scale
        op = _Ops(torch.is_grad_enabled(), call.ws)
        rows, fp = x.shape
        out, g, n = weight.shape[0], plan.groups, plan.rows_per_group
        nb, k = fp // bs, plan.kept_blocks * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with autocast_off(dy):
            if need_b:
                db = dy.sum(0).to(ctx.bias_dtype)
            kept = _reused(ctx, op.graph)
            if kept is None:
                wg, xk = InputPrunedLinear._gather(x, weight, call, op)
                xk = op.scaled(xk, scale)
            else:
                wg, xk = kept  # xk is scaled already
            dy = dy.to(wg.dtype)
            if plan.real_pos is None:
                dyk = dy.reshape(g, n, out)
            else:  # padding rows get a zero gradient, so they add nothing to dW
                dyk = op.put(dy.new_zeros(g * n, out), 0, plan.real_pos, dy).view(g, n, out)
            if need_x:
                dxk = op.scaled(op.bmm(dyk, wg.permute(1, 0, 2), "dx", (g, n, k)), scale)
                # scatter into the kept blocks; the extra block-row takes the padding
                index = plan.gather if plan.scatter is None else plan.scatter
                dx = op.put(dy.new_zeros(rows * nb + 1, bs), 0, index, dxk.reshape(-1, bs))
                dx = dx[: rows * nb].view(rows, fp).to(x.dtype)
            if need_w:
                # (G, O, k) on the kept columns only, summed over groups by one index_add
                # of contiguous block slices into the columns of dW. In place it is
                # written straight into W's gathered blocks (no longer needed), an
                # (O, G, k) buffer: a strided output, no copy.
                if op.graph:
                    dwk = torch.bmm(dyk.transpose(1, 2), xk).permute(1, 0, 2)
                else:
                    dwk = wg
                    if op.ws is not None:
                        op.ws.take("w", (out, g, k), wg)  # it is overwritten: restamp it
                    torch.bmm(dyk.transpose(1, 2), xk, out=dwk.permute(1, 0, 2))
                dw = op.add(dy.new_zeros(out, nb, bs), 1, plan.blocks, dwk.reshape(out, -1, bs))
                dw = dw.view(out, fp).to(weight.dtype)
        return dx, dw, db, None


# --------------------------------------------------------------------------------------
# Output pruning: block dropout on the Linear's output, fused into the GEMMs.


class OutputPrunedLinear(torch.autograd.Function):
    """``y = (x @ W.T + b) * mask`` computed on the kept output blocks only.

    ``x`` is ``(R, I)``, ``weight`` ``(Op, I)`` with ``Op = n_blocks * block_size``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, call: Call) -> Tensor:
        plan, bs, scale = call.plan, call.block_size, call.scale
        rows, op = x.shape[0], weight.shape[0]
        g, n = plan.groups, plan.rows_per_group
        nb, ko = op // bs, plan.kept_blocks * bs
        wg, xg = OutputPrunedLinear._gather(x, weight, call, _Ops(False, call.ws))
        wt = wg.transpose(1, 2)  # (G, I, ko): a transposed view, no copy
        yk = scratch(call.ws, "y", (g, n, ko), wg)
        if bias is None:
            torch.bmm(xg, wt, out=yk).mul_(scale)
        else:
            bg = bias.reshape(nb, bs).index_select(0, plan.blocks).view(g, 1, ko)
            bg = bg if call.dtype is None else bg.to(call.dtype)
            torch.baddbmm(bg, xg, wt, beta=scale, alpha=scale, out=yk)
        # dropped output blocks are zeros; the extra block-row takes the padding
        y = yk.new_zeros(rows * nb + 1, bs)
        y.index_copy_(0, plan.gather if plan.scatter is None else plan.scatter, yk.view(-1, bs))
        _remember(ctx, call, wg, xg, x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y[: rows * nb].view(rows, op)

    @staticmethod
    def _gather(x: Tensor, weight: Tensor, call: Call, op: _Ops) -> tuple[Tensor, Tensor]:
        """The kept output blocks of ``W`` (contiguous rows), ``(G, ko, I)``, and the
        rows of ``x`` batched by group, ``(G, n, I)``."""
        plan, bs = call.plan, call.block_size
        fin, g, n = x.shape[1], plan.groups, plan.rows_per_group
        ko = plan.kept_blocks * bs
        wg = op.gather(weight.reshape(-1, bs * fin), plan.blocks, (g, ko, fin), "w")
        if plan.row_src is None:
            xg = x.view(g, n, fin)
        else:
            xg = op.gather(x, plan.row_src, (g, n, fin), "x")
        if call.dtype is not None:
            wg, xg = wg.to(call.dtype), xg.to(call.dtype)
        return wg, xg

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        call: Call = ctx.call
        plan, bs, scale = call.plan, call.block_size, call.scale
        op = _Ops(torch.is_grad_enabled(), call.ws)
        rows, fin = x.shape
        opf, g, n = weight.shape[0], plan.groups, plan.rows_per_group
        nb, ko = opf // bs, plan.kept_blocks * bs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with autocast_off(dy):
            kept = _reused(ctx, op.graph)
            wg, xg = OutputPrunedLinear._gather(x, weight, call, op) if kept is None else kept
            dy = dy.to(wg.dtype)
            dyk = op.gather(dy.reshape(rows * nb, bs), plan.gather, (g, n, ko), "y")
            if plan.row_valid is not None:  # padding rows add nothing
                dyk = op.scaled(dyk, plan.row_valid.to(dyk.dtype))
            dyk = op.scaled(dyk, scale)
            if need_b:
                dbk = dyk.sum(1).reshape(-1, bs)  # (G*kb, bs)
                db = op.add(dy.new_zeros(nb, bs), 0, plan.blocks, dbk).view(opf).to(ctx.bias_dtype)
            if need_x:
                dx = torch.bmm(dyk, wg).view(g * n, fin)  # (G*n, I), dense
                if plan.real_pos is not None:
                    dx = dx.index_select(0, plan.real_pos)
                dx = dx.to(x.dtype)
            if need_w:
                # kept rows only; in place into W's gathered blocks (no longer needed)
                if op.graph:
                    dwk = torch.bmm(dyk.transpose(1, 2), xg)
                else:
                    dwk = wg
                    if op.ws is not None:
                        op.ws.take("w", (g, ko, fin), wg)  # it is overwritten: restamp it
                    torch.bmm(dyk.transpose(1, 2), xg, out=dwk)  # (G, ko, I)
                dw = op.add(dy.new_zeros(nb, bs * fin), 0, plan.blocks, dwk.reshape(-1, bs * fin))
                dw = dw.view(opf, fin).to(weight.dtype)
        return dx, dw, db, None


def pruned_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prune: Literal["input", "output"],
    call: Call,
) -> Tensor:
    """The pruned ``F.linear`` of ``x`` (``(R, Fp)`` for input pruning, ``(R, I)`` for
    output pruning; ``weight`` padded to whole blocks) on the kept blocks of
    ``call.plan``, kept values scaled by ``call.scale`` (see :class:`Call`)."""
    function = InputPrunedLinear if prune == "input" else OutputPrunedLinear
    y: Tensor = function.apply(x, weight, bias, call)
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
