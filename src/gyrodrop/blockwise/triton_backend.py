"""Triton backend of :class:`~gyrodrop.BlockGyroLinear`: pruned GEMMs without gathers.

The torch backend (:mod:`gyrodrop.blockwise.kernels`) gathers the kept blocks of ``W`` and of
the activation into scratch buffers and runs batched GEMMs on them. This backend runs
three Triton kernels (:mod:`gyrodrop.blockwise._triton_kernels`) that read the kept-block lists
directly: a GEMM tile loads the kept features of its row group straight from ``x``,
``W`` and ``dy`` (no gathered copy of either), accumulates in float32 and writes its
result in place (input gradients are scattered by the kernel itself, dropped columns
stay zero). All three GEMMs are pruned, for both placements:

============  ===================================  ===================================
GEMM          ``prune="input"``                    ``prune="output"``
============  ===================================  ===================================
forward       ``gathered_k_gemm`` (dense output)   ``gathered_n_gemm`` (kept columns)
input grad    ``gathered_n_gemm`` (kept columns)   ``gathered_k_gemm`` (dense output)
weight grad   ``weight_grad_gemm`` (kept columns)  ``weight_grad_gemm`` (kept rows)
============  ===================================  ===================================

Any ``in/out`` features (a shorter last block is masked in the kernels, no padded
copy), any row groups (uneven ones included), float16/bfloat16/float32 inputs.

Requirements: ``triton`` (``pip install gyrodrop[triton]``). On CUDA tensors the
kernels are compiled and autotuned over tile sizes (the reduction tile a multiple of
32, the paper's block); on CPU tensors they run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set (slow: that is how the tests check them without a GPU).
Triton itself is imported only when a kernel is first needed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TritonPlan", "build_plan", "interpreting", "is_available", "pruned_linear"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """Whether ``triton`` is installed (it is imported only when a kernel runs)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or half-imported module
        return False


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class TritonPlan:
    """The kept blocks and the row groups of one active set and batch layout.

    ``G`` active row groups (those with at least one row), each keeping ``kept_blocks``
    of the ``n_blocks`` blocks of ``block_size`` features of the masked side
    (``features`` of them, the last block possibly shorter).

    Attributes:
        kept: ``(G, kept_blocks)`` int32, the sorted kept block ids of every group.
        keep: ``(G, n_blocks)`` int32, 1 where a block is kept (for the weight gradient).
        kept_before: ``(G, n_blocks + 1)`` int32, kept blocks before each block (prefix
            counts: a weight-gradient tile skips the groups that keep none of its blocks).
        row_start: ``(G,)`` int32, each group's first row of the flattened input.
        row_count: ``(G,)`` int32, its number of rows (groups may differ).
        max_rows: the largest ``row_count``.
        row_bounds: ``(start, count)`` of every group as Python ints (no device sync).
        n_blocks, kept_blocks, block_size, features: as above.
        scale: ``1 / (1 - effective_p)``, applied to kept values.
    """

    kept: Tensor
    keep: Tensor
    kept_before: Tensor
    row_start: Tensor
    row_count: Tensor
    max_rows: int
    row_bounds: tuple[tuple[int, int], ...]
    n_blocks: int
    kept_blocks: int
    block_size: int
    features: int
    scale: float

    @property
    def groups(self) -> int:
        """The number of active row groups ``G``."""
        return int(self.kept.shape[0])

    def feature_keep(self, dtype: torch.dtype) -> Tensor:
        """``(G, features)`` 0/1 keep mask of the features of every group."""
        mask = self.keep.to(dtype).repeat_interleave(self.block_size, dim=1)
        return mask[:, : self.features]


def build_plan(
    kept: Tensor,
    counts: list[int],
    rows_per_sample: int,
    *,
    n_blocks: int,
    block_size: int,
    features: int,
    scale: float,
) -> TritonPlan:
    """The plan for kept-block lists ``kept`` (``(tau, kb)`` sorted block ids, one row
    per subnetwork of the active set) and the per-group sample counts ``counts`` of the
    local batch (each sample has ``rows_per_sample`` rows of the flattened input).
    Groups without rows are left out. Raises ``ValueError`` when no group has rows."""
    if len(counts) != kept.shape[0]:
        raise ValueError(
            f"build_plan: counts has {len(counts)} groups but kept has {kept.shape[0]} rows"
        )
    device = kept.device
    active = [g for g, c in enumerate(counts) if c > 0]
    if not active:
        raise ValueError("build_plan: every row group is empty")
    rows = [counts[g] * rows_per_sample for g in active]
    starts, total = [], 0
    for c in counts:
        if c > 0:
            starts.append(total)
        total += c * rows_per_sample
    sel = kept[torch.tensor(active, dtype=torch.int64, device=device)].to(torch.int64)
    keep = torch.zeros(len(active), n_blocks, dtype=torch.int32, device=device)
    keep.scatter_(1, sel, 1)
    kept_before = torch.zeros(len(active), n_blocks + 1, dtype=torch.int32, device=device)
    kept_before[:, 1:] = keep.cumsum(1)
    return TritonPlan(
        kept=sel.to(torch.int32).contiguous(),
        keep=keep,
        kept_before=kept_before,
        row_start=torch.tensor(starts, dtype=torch.int32, device=device),
        row_count=torch.tensor(rows, dtype=torch.int32, device=device),
        max_rows=max(rows),
        row_bounds=tuple(zip(starts, rows, strict=True)),
        n_blocks=n_blocks,
        kept_blocks=int(sel.shape[1]),
        block_size=block_size,
        features=features,
        scale=scale,
    )


# --------------------------------------------------------------------------------------
# Building the kernels (lazily: importing this module does not import triton).


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the interpreter runs (compiled kernels are autotuned instead);
    ``block_n`` (the kept-feature tile of ``gathered_n_gemm``) and ``block_k`` (the
    reduction tile) multiples of 32 on GPUs, as the contiguity hint assumes."""

    block_m: int = 16
    block_n: int = 32
    block_k: int = 32


INTERPRETER_TILES = TileConfig()


def _autotune_configs(kind: str) -> list[Any]:
    import triton

    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); reduction tiles multiples of 32
    tiles = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    if kind == "wgrad":
        # the reduction runs over a group's rows; the masked side (N for input
        # pruning, M for output pruning) skips a group only when the group keeps none
        # of the tile's blocks, so narrow tiles (one 32-wide block) prune exactly and
        # wide ones use the tensor cores better: both kinds are offered
        tiles = [
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (128, 32, 64, 4, 4),
            (32, 128, 64, 4, 4),
            (256, 32, 64, 8, 3),
            (32, 256, 64, 8, 3),
        ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


@functools.cache
def kernels(interpret: bool) -> dict[str, Any]:
    """The three kernels, compiled-and-autotuned (``interpret=False``, CUDA) or run by
    Triton's interpreter (``interpret=True``, CPU tensors). Cached per mode."""
    try:
        import triton

        from gyrodrop.blockwise import _triton_kernels as src
    except ImportError as exc:
        raise RuntimeError(
            "BlockGyroLinear: backend='triton' needs the triton package "
            "(pip install 'gyrodrop[triton]'); use backend='torch' without it"
        ) from exc
    fns = {
        "gk": src.gathered_k_gemm,
        "gn": src.gathered_n_gemm,
        "wgrad": src.weight_grad_gemm,
    }
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return {name: InterpretedFunction(fn) for name, fn in fns.items()}
    keys = {
        "gk": ["N", "F", "KB", "max_rows", "BS"],
        "gn": ["K", "F", "KB", "max_rows", "BS"],
        "wgrad": ["M", "N", "KB", "G", "BS"],
    }
    # JITFunction itself, not triton.jit: that would return an interpreted function
    # whenever TRITON_INTERPRET is set, even for CUDA tensors
    from triton.runtime.jit import JITFunction

    return {
        name: triton.autotune(configs=_autotune_configs(name), key=keys[name])(JITFunction(fn))
        for name, fn in fns.items()
    }


def _launch_options(interpret: bool, dtype: torch.dtype, block_size: int) -> dict[str, Any]:
    """The constexpr options every kernel takes besides its tiles."""
    if interpret:
        precision = "ieee"
    else:
        allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if allow_tf32 else "ieee"
    return {
        "BS": block_size,
        # the interpreter multiplies bfloat16 tiles wrongly: upcast there (exact anyway)
        "UPCAST": interpret,
        "PRECISION": precision if dtype == torch.float32 else "tf32",
    }


def _contiguity_hint(block_size: int) -> int:
    """Contiguous runs of features inside a reduction (or output) tile: the largest
    power of two dividing ``block_size``, capped at 32. Every tile is a multiple of 32
    features of the kept list, so its features come in runs of that length, each
    starting at a multiple of it (a hint that lets the compiler vectorize the loads)."""
    return min(block_size & -block_size, 32)


def _tiles(interpret: bool, tiles: TileConfig | None) -> dict[str, int]:
    if not interpret:
        return {}  # autotuned
    t = tiles or INTERPRETER_TILES
    return {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gathered(
    kind: str,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    bias: Tensor | None,
    plan: TritonPlan,
    *,
    dense: int,
    b_strides: tuple[int, int],
    interpret: bool,
    tiles: TileConfig | None,
) -> None:
    """Launch ``gathered_k_gemm`` (``kind="gk"``, ``dense`` = output columns) or
    ``gathered_n_gemm`` (``"gn"``, ``dense`` = reduction length) on ``plan``'s groups."""
    kernel = kernels(interpret)[kind]
    fixed = _tiles(interpret, tiles)
    opts = _launch_options(interpret, a.dtype, plan.block_size)
    groups, max_rows = plan.groups, plan.max_rows

    if kind == "gk":

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (groups * _cdiv(max_rows, meta["BLOCK_M"]), _cdiv(dense, meta["BLOCK_N"]))

    else:
        width = plan.kept_blocks * plan.block_size

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (groups * _cdiv(max_rows, meta["BLOCK_M"]), _cdiv(width, meta["BLOCK_N"]))

    kernel[grid](
        a,
        b,
        out,
        out if bias is None else bias,
        plan.kept,
        plan.row_start,
        plan.row_count,
        dense,
        plan.features,
        plan.kept_blocks,
        max_rows,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        b_strides[1],
        out.stride(0),
        out.stride(1),
        plan.scale,
        HAS_BIAS=bias is not None,
        HINT=_contiguity_hint(plan.block_size),
        **opts,
        **fixed,
    )


def _weight_grad(
    dy: Tensor,
    x: Tensor,
    plan: TritonPlan,
    out_dtype: torch.dtype,
    *,
    mask_on_out: bool,
    interpret: bool,
    tiles: TileConfig | None,
) -> Tensor:
    """``dW = scale * sum_g dy_g.T @ x_g`` on each group's kept rows (``mask_on_out``)
    or kept columns of ``W``; ``(O, I)`` in ``out_dtype``."""
    m, n = dy.shape[1], x.shape[1]
    dw = torch.empty(m, n, dtype=out_dtype, device=dy.device)
    kernel = kernels(interpret)["wgrad"]

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (_cdiv(m, meta["BLOCK_M"]), _cdiv(n, meta["BLOCK_N"]))

    kernel[grid](
        dy,
        x,
        dw,
        plan.keep,
        plan.kept_before,
        plan.row_start,
        plan.row_count,
        m,
        n,
        plan.n_blocks,
        plan.kept_blocks,
        plan.groups,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        dw.stride(1),
        plan.scale,
        MASK_ON_M=mask_on_out,
        **_launch_options(interpret, dy.dtype, plan.block_size),
        **_tiles(interpret, tiles),
    )
    return dw


# --------------------------------------------------------------------------------------
# Autograd.


def _check(x: Tensor, weight: Tensor, owner: str) -> bool:
    """Validate devices/dtypes; return whether the interpreter runs the kernels."""
    if x.device != weight.device:
        raise ValueError(f"{owner}: input on {x.device} but weight on {weight.device}")
    if x.device.type == "cuda":
        interpret = False
    elif x.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                f"{owner}: backend='triton' on CPU tensors runs Triton's interpreter, which "
                "needs the environment variable TRITON_INTERPRET=1 (slow: meant for tests); "
                "use backend='torch' or 'auto' on the CPU"
            )
        interpret = True
    else:
        raise RuntimeError(
            f"{owner}: backend='triton' supports CUDA tensors (and CPU tensors under "
            f"TRITON_INTERPRET=1), got a tensor on {x.device}; use backend='torch'"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(
            f"{owner}: backend='triton' supports float16, bfloat16 and float32, got {x.dtype}; "
            "use backend='torch'"
        )
    if x.dtype != weight.dtype:
        raise ValueError(
            f"{owner}: input dtype {x.dtype} differs from weight dtype {weight.dtype} "
            "(as for F.linear, cast one or use autocast)"
        )
    return interpret


class _TritonPruned(torch.autograd.Function):
    """``F.linear(x * mask, W, b)`` (input pruning) or ``F.linear(x, W, b) * mask``
    (output pruning), the mask given by ``plan``; all three GEMMs pruned."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: TritonPlan,
        prune: str,
        dtype: torch.dtype | None,
        tiles: TileConfig | None,
    ) -> Tensor:
        xc = x if dtype is None else x.to(dtype)
        wc = weight if dtype is None else weight.to(dtype)
        interpret = _check(xc, wc, "BlockGyroLinear")
        rows, out = x.shape[0], weight.shape[0]
        if prune == "input":
            y = torch.empty(rows, out, dtype=xc.dtype, device=x.device)
            _gathered(
                "gk",
                xc,
                wc,
                y,
                bias,
                plan,
                dense=out,
                b_strides=(wc.stride(1), wc.stride(0)),
                interpret=interpret,
                tiles=tiles,
            )
        else:
            y = torch.zeros(rows, out, dtype=xc.dtype, device=x.device)
            _gathered(
                "gn",
                xc,
                wc,
                y,
                bias,
                plan,
                dense=x.shape[1],
                b_strides=(wc.stride(1), wc.stride(0)),
                interpret=interpret,
                tiles=tiles,
            )
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.prune, ctx.dtype, ctx.tiles = plan, prune, dtype, tiles
        ctx.interpret = interpret
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        plan: TritonPlan = ctx.plan
        dtype, interpret, tiles = ctx.dtype, ctx.interpret, ctx.tiles
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xc = x if dtype is None else x.to(dtype)
        wc = weight if dtype is None else weight.to(dtype)
        dy = dy.to(xc.dtype)
        dx = dw = db = None
        if ctx.prune == "input":
            if need_x:
                dx = torch.zeros_like(xc)  # dropped input features get no gradient
                _gathered(
                    "gn",
                    dy,
                    wc,
                    dx,
                    None,
                    plan,
                    dense=weight.shape[0],
                    b_strides=(wc.stride(0), wc.stride(1)),
                    interpret=interpret,
                    tiles=tiles,
                )
            if need_w:
                dw = _weight_grad(
                    dy, xc, plan, weight.dtype, mask_on_out=False, interpret=interpret, tiles=tiles
                )
            if need_b:
                db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        else:
            if need_x:
                dx = torch.empty_like(xc)
                _gathered(
                    "gk",
                    dy,
                    wc,
                    dx,
                    None,
                    plan,
                    dense=x.shape[1],
                    b_strides=(wc.stride(0), wc.stride(1)),
                    interpret=interpret,
                    tiles=tiles,
                )
            if need_w:
                dw = _weight_grad(
                    dy, xc, plan, weight.dtype, mask_on_out=True, interpret=interpret, tiles=tiles
                )
            if need_b:
                db = _output_bias_grad(dy, plan).to(ctx.bias_dtype)
        if dx is not None:
            dx = dx.to(x.dtype)
        return dx, dw, db, None, None, None, None


def _output_bias_grad(dy: Tensor, plan: TritonPlan) -> Tensor:
    """``db = scale * sum_g keep_g * sum_{r in g} dy[r]`` (float32), output pruning."""
    sums = torch.stack([dy.narrow(0, s, c).sum(0, dtype=torch.float32) for s, c in plan.row_bounds])
    return (sums * plan.feature_keep(torch.float32)).sum(0) * plan.scale


@torch.compiler.disable  # a graph break: dynamo does not trace the kernel launches
def pruned_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: TritonPlan,
    prune: str,
    dtype: torch.dtype | None = None,
    tiles: TileConfig | None = None,
) -> Tensor:
    """The block-pruned Linear of ``plan`` with the Triton kernels, differentiable in
    ``x``, ``weight`` and ``bias`` (once: no double backward).

    Args:
        x: ``(R, in_features)``, rows of a group consecutive as in ``plan``.
        weight: ``(out_features, in_features)``; bias: ``(out_features,)`` or ``None``.
        plan: from :func:`build_plan`, over the input features (``prune="input"``) or
            the output features (``prune="output"``).
        prune: ``"input"`` (``F.linear(x * mask, W, b)``) or ``"output"``
            (``F.linear(x, W, b) * mask``), ``mask`` scaled by ``plan.scale``.
        dtype: compute dtype (autocast's), or ``None`` for ``x``'s dtype.
        tiles: tile sizes for interpreter runs (ignored on CUDA, where they are autotuned).

    Returns ``(R, out_features)`` in the compute dtype. Raises ``RuntimeError`` without
    triton, on CPU tensors without ``TRITON_INTERPRET=1`` or on other devices, and
    ``ValueError`` for unsupported dtypes or mismatched devices/dtypes.
    """
    if prune not in ("input", "output"):
        raise ValueError(f"pruned_linear: prune must be 'input' or 'output', got {prune!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"pruned_linear: expected x (R, I) and weight (O, I), got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    side = x.shape[1] if prune == "input" else weight.shape[0]
    if side != plan.features:
        raise ValueError(
            f"pruned_linear: the plan masks {plan.features} features but the {prune} "
            f"side has {side}"
        )
    rows = sum(plan.row_bounds[-1])  # the last group ends the batch
    if rows != x.shape[0]:
        raise ValueError(f"pruned_linear: the plan covers {rows} rows, x has {x.shape[0]}")
    y: Tensor = _TritonPruned.apply(x, weight, bias, plan, prune, dtype, tiles)
    return y
