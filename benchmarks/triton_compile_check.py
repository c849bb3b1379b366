"""Compile every Triton kernel of gyrodrop.blockwise.triton_backend for a GPU, without a GPU.

    python benchmarks/triton_compile_check.py                  # sm_90 (H100/H200), all dtypes
    python benchmarks/triton_compile_check.py --arch 80 --dtypes bf16

Triton compiles ahead of time for an explicit target (AST -> TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas it ships), so this runs on a CPU-only machine. Every
kernel is compiled for every autotune config and every use (forward, input gradient and
weight gradient of both placements), with the specializations the launcher makes at run time
for contiguous tensors (unit strides as constants, 16-byte-aligned pointers and sizes).
For each it reports what the interpreter tests cannot show: whether the loads were
pipelined (``cp.async``), whether the GEMM uses the tensor cores (``wgmma`` on sm_90,
``mma`` before), and the shared memory used. It says nothing about speed.
Exit status 1 when a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

INDEX_ARGS = ("kept_ptr", "keep_ptr", "kept_before_ptr", "row_start_ptr", "row_count_ptr")
# Every use of a kernel (see gyrodrop.blockwise.triton_backend): its unit-stride arguments for
# row-major x, W and dy, and its flag.
USES = [
    ("input fwd", "gathered_k_gemm", ("stride_ak", "stride_bk", "stride_cn"), "HAS_BIAS", True),
    ("output dx", "gathered_k_gemm", ("stride_ak", "stride_bn", "stride_cn"), "HAS_BIAS", False),
    ("output fwd", "gathered_n_gemm", ("stride_ak", "stride_bk", "stride_cn"), "HAS_BIAS", True),
    ("input dx", "gathered_n_gemm", ("stride_ak", "stride_bn", "stride_cn"), "HAS_BIAS", False),
    ("input dW", "weight_grad_gemm", ("stride_am", "stride_bn", "stride_cn"), "MASK_ON_M", False),
    ("output dW", "weight_grad_gemm", ("stride_am", "stride_bn", "stride_cn"), "MASK_ON_M", True),
]
KIND = {"gathered_k_gemm": "gk", "gathered_n_gemm": "gn", "weight_grad_gemm": "wgrad"}
# sizes the launcher sees as multiples of 16 for aligned shapes (4096 features, ...)
SIZES = ("N", "K", "M", "F")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError:
        print("triton_compile_check: triton is not installed")
        return 0
    from gyrodrop.blockwise import _triton_kernels as kernels
    from gyrodrop.blockwise.triton_backend import _autotune_configs, _contiguity_hint

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}, block_size {args.block_size}\n")
    header = [
        "dtype", "GEMM", "kernel", "tiles (M, N, K)", "warps/stages", "result", "cp.async",
        "tensor-core ops", "shared KiB", "compile s",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dt in args.dtypes.split(","):
        precision = "ieee" if dt == "fp32" else "tf32"
        for use, name, unit, flag_name, flag in USES:
            kind = KIND[name]
            jf = JITFunction(getattr(kernels, name))
            for cfg in _autotune_configs(kind):
                consts: dict[str, object] = dict(
                    BS=args.block_size, UPCAST=False, PRECISION=precision, **cfg.kwargs
                )
                consts[flag_name] = flag
                if kind != "wgrad":
                    consts["HINT"] = _contiguity_hint(args.block_size)
                for u in unit:
                    consts[u] = 1
                sig: dict[str, str] = {}
                attrs: dict[tuple[int, ...], list[list[object]]] = {}
                for i, arg in enumerate(jf.arg_names):
                    if arg in consts:
                        sig[arg] = "constexpr"
                    elif arg in INDEX_ARGS:
                        sig[arg] = "*i32"
                    elif arg.endswith("_ptr"):
                        sig[arg] = "*" + dt
                    elif arg == "scale":
                        sig[arg] = "fp32"
                    else:
                        sig[arg] = "i32"
                    pointer = sig[arg].startswith("*")
                    size = sig[arg] == "i32" and (arg.startswith("stride") or arg in SIZES)
                    if pointer or size:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                start = time.time()
                try:
                    compiled = triton.compile(
                        ASTSource(jf, sig, consts, attrs),
                        target=target,
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                    )
                except Exception as exc:  # noqa: BLE001 - report every failure
                    failures += 1
                    result, cp, mma, shared = f"FAIL: {type(exc).__name__}", "-", "-", "-"
                    print(f"<!-- {exc} -->")
                else:
                    ptx = compiled.asm["ptx"]
                    result = "ok"
                    cp = str(ptx.count("cp.async"))
                    mma = str(ptx.count("wgmma") or ptx.count("mma.sync"))
                    shared = f"{compiled.metadata.shared / 1024:.0f}"
                tiles = tuple(cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                cells = [
                    dt, use, kind, tiles, f"{cfg.num_warps}/{cfg.num_stages}", result, cp, mma,
                    shared, f"{time.time() - start:.1f}",
                ]  # fmt: skip
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print(f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
