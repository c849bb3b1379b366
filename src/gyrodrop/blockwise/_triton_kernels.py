"""Triton kernels of block-wise gyro dropout's pruned GEMMs (undecorated sources).

This module imports ``triton`` and is only imported by :mod:`gyrodrop.blockwise.triton_backend`
when a Triton backend is used; the library itself imports without Triton. The kernel
functions below are plain Python functions written in Triton's language:
:func:`gyrodrop.blockwise.triton_backend.kernels` wraps them with ``triton.jit`` (and
``triton.autotune`` over tile sizes) for GPUs, or with Triton's interpreter for CPU
tensors (``TRITON_INTERPRET=1``), deciding at build time rather than at import time.

Notation shared by the kernels. The batch is split into ``G`` row groups (group ``g``
owns rows ``row_start[g] .. row_start[g] + row_count[g] - 1``); group ``g`` keeps the
``KB`` blocks ``kept[g, :]`` (sorted block ids) of ``BS`` adjacent features each, out
of ``NB`` blocks; ``keep[g, b]`` is 1 when block ``b`` is kept in group ``g``. A kept
feature list is never materialized: the ``j``-th kept feature of group ``g`` is
``kept[g, j // BS] * BS + j % BS``, dropped when it is past the true feature count
``F`` (the shorter last block). Every GEMM accumulates in float32 and multiplies by the
dropout scale ``1 / (1 - p_eff)`` once, on the accumulator.

Three kernels serve the six GEMMs (``x`` is ``(R, I)``, ``W`` ``(O, I)``, ``dy``
``(R, O)``):

* :func:`gathered_k_gemm` -- the reduction runs over one group's kept features:
  input pruning's forward (``y = x[:, K_g] @ W[:, K_g].T``) and output pruning's input
  gradient (``dx = dy[:, K_g] @ W[K_g, :]``); the output is dense.
* :func:`gathered_n_gemm` -- the output columns are one group's kept features: output
  pruning's forward (``y[:, K_g] = x @ W[K_g, :].T``) and input pruning's input gradient
  (``dx[:, K_g] = dy @ W[:, K_g]``); the other columns are left as they are (zeros).
* :func:`weight_grad_gemm` -- ``dW = sum_g dy_g.T @ x_g`` restricted, per group, to the
  kept rows of ``W`` (output pruning, ``MASK_ON_M``) or its kept columns (input
  pruning): a tile of ``dW`` skips every group that keeps none of its blocks, and
  never loads dropped features.
"""

from __future__ import annotations

import triton.language as tl

# The kernels take strides as arguments (any layout of x, W and dy, including expanded
# gradients with zero strides) and use 64-bit row offsets.


def gathered_k_gemm(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    kept_ptr,
    row_start_ptr,
    row_count_ptr,
    N,
    F,
    KB,
    max_rows,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    scale,
    HAS_BIAS: tl.constexpr,
    BS: tl.constexpr,
    HINT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C[r, n] = scale * sum_j A[r, f_g(j)] * B[f_g(j), n] (+ bias[n])`` for the rows
    ``r`` of group ``g``, ``f_g(j)`` its ``j``-th kept feature (``KB * BS`` of them)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_group = (max_rows + BLOCK_M - 1) // BLOCK_M
    g = pid_m // tiles_per_group
    tile = pid_m % tiles_per_group
    start = tl.load(row_start_ptr + g)
    count = tl.load(row_count_ptr + g)
    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < count
    rows = (start + local).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, KB * BS, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        blk_i = j // BS
        k_ok = blk_i < KB
        blk = tl.load(kept_ptr + g * KB + blk_i, mask=k_ok, other=0)
        feat = blk * BS + j % BS
        feat = tl.max_contiguous(tl.multiple_of(feat, HINT), HINT)
        k_ok = k_ok & (feat < F)
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + feat[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + feat[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(
        c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def gathered_n_gemm(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    kept_ptr,
    row_start_ptr,
    row_count_ptr,
    K,
    F,
    KB,
    max_rows,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    scale,
    HAS_BIAS: tl.constexpr,
    BS: tl.constexpr,
    HINT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C[r, f_g(j)] = scale * (sum_k A[r, k] * B[k, f_g(j)] (+ bias[f_g(j)]))`` for the
    rows ``r`` of group ``g`` and its kept features ``f_g(j)``; other columns untouched."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_group = (max_rows + BLOCK_M - 1) // BLOCK_M
    g = pid_m // tiles_per_group
    tile = pid_m % tiles_per_group
    start = tl.load(row_start_ptr + g)
    count = tl.load(row_count_ptr + g)
    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < count
    rows = (start + local).to(tl.int64)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    blk_i = j // BS
    n_ok = blk_i < KB
    blk = tl.load(kept_ptr + g * KB + blk_i, mask=n_ok, other=0)
    feat = blk * BS + j % BS
    feat = tl.max_contiguous(tl.multiple_of(feat, HINT), HINT)
    n_ok = n_ok & (feat < F)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + feat[None, :] * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + feat, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = acc * scale
    tl.store(
        c_ptr + rows[:, None] * stride_cm + feat[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


def weight_grad_gemm(
    a_ptr,
    b_ptr,
    c_ptr,
    keep_ptr,
    kept_before_ptr,
    row_start_ptr,
    row_count_ptr,
    M,
    N,
    NB,
    KB,
    G,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_cm,
    stride_cn,
    scale,
    MASK_ON_M: tl.constexpr,
    BS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C[m, n] = scale * sum_g sum_{r in g} A[r, m] * B[r, n] * keep_g(m or n)``: the
    weight gradient, ``A = dy`` (``(R, O)``), ``B = x`` (``(R, I)``), the mask on the
    output features ``m`` (``MASK_ON_M``, output pruning) or the input features ``n``.

    Pruning is at tile granularity: a tile skips a group's rows when the group keeps
    none of the tile's blocks, and otherwise multiplies the dropped features as zeros
    (never loaded). A masked-side tile of one dropout block prunes exactly; wider tiles
    run the tensor cores more efficiently but skip less: the autotuner picks with the
    real masks (``KB``, kept blocks per group, is only part of its key)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    if MASK_ON_M:
        blk = ms // BS
        blk_ok = m_ok
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, M) - 1
        first_blk = first // BS
        last_blk = last // BS
    else:
        blk = ns // BS
        blk_ok = n_ok
        first = pid_n * BLOCK_N
        last = tl.minimum(first + BLOCK_N, N) - 1
        first_blk = first // BS
        last_blk = last // BS
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for g in range(G):
        # kept blocks of group g among the tile's blocks, from the prefix counts
        # kept_before[g, b] (kept blocks < b): no reduction, two scalar loads
        n_kept = tl.load(kept_before_ptr + g * (NB + 1) + last_blk + 1) - tl.load(
            kept_before_ptr + g * (NB + 1) + first_blk
        )
        if n_kept > 0:  # the tile keeps a block in group g: accumulate its rows
            keep = tl.load(keep_ptr + g * NB + blk, mask=blk_ok, other=0) != 0
            start = tl.load(row_start_ptr + g)
            count = tl.load(row_count_ptr + g)
            if MASK_ON_M:
                a_col_ok = keep
                b_col_ok = n_ok
            else:
                a_col_ok = m_ok
                b_col_ok = keep
            for r0 in range(0, count, BLOCK_K):
                local = r0 + tl.arange(0, BLOCK_K)
                r_ok = local < count
                rows = (start + local).to(tl.int64)
                a = tl.load(  # (BLOCK_M, BLOCK_K): A transposed
                    a_ptr + ms[:, None] * stride_am + rows[None, :] * stride_ar,
                    mask=a_col_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    b_ptr + rows[:, None] * stride_br + ns[None, :] * stride_bn,
                    mask=r_ok[:, None] & b_col_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(
        c_ptr + ms[:, None] * stride_cm + ns[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )
