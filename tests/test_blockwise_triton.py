"""The Triton backend of BlockGyroLinear (gyrodrop.blockwise.triton_backend).

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set per test); where CUDA is available the same tests also run
the compiled kernels on the GPU (``device="cuda"``). Every kernel is checked against
the dense reference ``F.linear(x * mask, W, b)`` (input pruning) or
``F.linear(x, W, b) * mask`` (output pruning), forward and all gradients, in float64.
Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gyrodrop
from gyrodrop.blockwise import triton_backend as bt

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# relative tolerance of each dtype against the float64 reference (fp32 accumulation)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors run the kernels in Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _random_plan(
    features: int, block_size: int, counts: list[int], drop: int, seed: int, device: str
) -> tuple[bt.TritonPlan, torch.Tensor]:
    """A plan with random kept blocks, and the dense scaled mask ``(R, features)``."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-features // block_size)
    kb = nb - drop
    kept = torch.stack([torch.randperm(nb, generator=g)[:kb].sort().values for _ in counts])
    scale = nb / kb
    plan = bt.build_plan(
        kept.to(device),
        counts,
        1,
        n_blocks=nb,
        block_size=block_size,
        features=features,
        scale=scale,
    )
    keep = torch.zeros(len(counts), nb).scatter_(1, kept, 1.0)
    keep = keep.repeat_interleave(block_size, 1)[:, :features] * scale
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return plan, keep[rows].double().to(device)


def _check_against_dense(
    prune: str,
    in_features: int,
    out_features: int,
    block_size: int,
    counts: list[int],
    dtype: torch.dtype,
    device: str,
    *,
    bias: bool = True,
    tiles: bt.TileConfig | None = None,
    seed: int = 0,
) -> None:
    features = in_features if prune == "input" else out_features
    nb = -(-features // block_size)
    plan, mask = _random_plan(features, block_size, counts, max(1, nb // 2), seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    rows = sum(counts)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(out_features, in_features, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(out_features, generator=g).to(device, dtype).requires_grad_() if bias else None
    params = [x, w] + ([b] if b is not None else [])

    y = bt.pruned_linear(x, w, b, plan, prune, tiles=tiles)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, params, dy)

    ref_params = [p.detach().double().requires_grad_() for p in params]
    xr, wr = ref_params[:2]
    br = ref_params[2] if b is not None else None
    ref = F.linear(xr * mask, wr, br) if prune == "input" else F.linear(xr, wr, br) * mask
    ref_grads = torch.autograd.grad(ref, ref_params, dy.double())

    tol = TOL[dtype]
    names = ["y", "dx", "dW", "db"][: 1 + len(grads)]
    for name, got, want in zip(names, [y, *grads], [ref, *ref_grads], strict=True):
        assert got.dtype == dtype, name
        scale = want.abs().max().item() + 1.0
        torch.testing.assert_close(
            got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    dropped = mask == 0
    if prune == "input":  # dropped input features get exactly zero gradient
        assert (grads[0].double()[dropped] == 0).all()
    else:  # dropped outputs are exactly zero
        assert (y.double()[dropped] == 0).all()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", ["input", "output"])
@pytest.mark.parametrize(
    ("in_features", "out_features", "block_size", "counts"),
    [
        (64, 48, 16, [8, 8]),  # even groups, features a multiple of the block
        (70, 45, 16, [5, 3, 0, 4]),  # shorter last block, uneven and empty groups
        (50, 33, 8, [7, 6, 6]),  # shorter last block on both sides
        (96, 40, 32, [19]),  # one group, the paper's 32-wide block
        (60, 72, 12, [3, 9]),  # a block size that is not a power of two
    ],
)
def test_kernels_match_the_dense_reference_forward_and_gradients(
    device: str,
    prune: str,
    in_features: int,
    out_features: int,
    block_size: int,
    counts: list[int],
) -> None:
    _check_against_dense(
        prune, in_features, out_features, block_size, counts, torch.float32, device
    )


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_accumulate_half_precision_inputs_in_float32(
    device: str, prune: str, dtype: torch.dtype
) -> None:
    _check_against_dense(prune, 80, 40, 16, [9, 7], dtype, device, seed=3)


@needs_triton
@pytest.mark.parametrize("prune", ["input", "output"])
def test_kernels_without_bias(prune: str) -> None:
    _check_against_dense(prune, 48, 40, 16, [4, 5], torch.float32, "cpu", bias=False)


@needs_triton
@pytest.mark.parametrize("prune", ["input", "output"])
@pytest.mark.parametrize(
    "tiles",
    [bt.TileConfig(16, 16, 16), bt.TileConfig(32, 64, 64), bt.TileConfig(16, 32, 128)],
    ids=["tiles16", "tiles32x64x64", "k128"],
)
def test_kernels_are_tile_size_independent(prune: str, tiles: bt.TileConfig) -> None:
    """Tiles smaller and larger than the block, spanning several kept blocks or a
    group boundary."""
    _check_against_dense(prune, 72, 40, 16, [13, 6, 11], torch.float32, "cpu", tiles=tiles)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    prune=st.sampled_from(["input", "output"]),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 70),
    block_size=st.integers(1, 24),
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda c: sum(c) > 0),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_the_dense_reference_on_random_shapes(
    prune: str,
    in_features: int,
    out_features: int,
    block_size: int,
    counts: list[int],
    seed: int,
) -> None:
    features = in_features if prune == "input" else out_features
    assume(features >= 2)
    block_size = min(block_size, features // 2)  # at least two blocks: one dropped, one kept
    _check_against_dense(
        prune, in_features, out_features, block_size, counts, torch.float32, "cpu", seed=seed
    )


# --------------------------------------------------------------------------------------
# BlockGyroLinear(backend=...)


def _pair(prune: str, device: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    layer = gyrodrop.BlockGyroLinear(
        70,
        45,
        p=0.5,
        num_subnets=8,
        subnets_per_step=3,
        block_size=16,
        steps_per_set=2,
        prune=prune,
        backend="torch",
        device=device,
        **kwargs,  # type: ignore[arg-type]
    )
    triton_layer = copy.deepcopy(layer)
    triton_layer.backend = "triton"
    return layer, triton_layer


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", ["input", "output"])
def test_triton_backend_equals_torch_backend_and_dense_mask_over_steps(
    device: str, prune: str
) -> None:
    """Same outputs and gradients as backend='torch' and as the documented dense
    reference, over steps (set changes), uneven groups and (B, T, F) inputs."""
    ref_layer, layer = _pair(prune, device)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(7, 2, 70, generator=g).to(device)
        mask = layer.dense_mask(7, device=device)[:, None, :]
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref_layer(xa), layer(xb)
        if prune == "input":
            dense = F.linear(x * mask, layer.weight, layer.bias)
        else:
            dense = F.linear(x, layer.weight, layer.bias) * mask
        torch.testing.assert_close(yb, dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        (ya.square().sum()).backward()
        (yb.square().sum()).backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        for pa, pb in zip(ref_layer.parameters(), layer.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-4)
        ref_layer.zero_grad()
        layer.zero_grad()
    assert isinstance(layer._plan, bt.TritonPlan)
    assert not isinstance(ref_layer._plan, bt.TritonPlan)


@needs_triton
@pytest.mark.parametrize("prune", ["input", "output"])
def test_triton_backend_under_autocast_computes_in_the_autocast_dtype(prune: str) -> None:
    ref_layer, layer = _pair(prune, "cpu")
    x = torch.randn(6, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref_layer(x), layer(x)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=3e-2, atol=3e-2)
    yb.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@needs_triton
def test_triton_backend_on_cpu_without_the_interpreter_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    _, layer = _pair("input", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(4, 70))


@needs_triton
def test_triton_backend_rejects_float64_with_a_hint() -> None:
    _, layer = _pair("input", "cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32.*backend='torch'"):
        layer(torch.randn(4, 70, dtype=torch.float64))


def test_auto_backend_uses_torch_on_the_cpu() -> None:
    layer = gyrodrop.BlockGyroLinear(64, 8, p=0.5, block_size=16, steps_per_set=2)
    assert layer.backend == "auto"
    layer(torch.randn(4, 64))
    assert not isinstance(layer._plan, bt.TritonPlan)
    assert "backend=auto" in repr(layer)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\)"):
        gyrodrop.BlockGyroLinear(64, 8, p=0.5, block_size=16, backend="cuda")


def test_library_imports_and_falls_back_without_triton() -> None:
    """With triton unimportable, gyrodrop imports, 'auto' works, and 'triton' says
    what to install."""
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        import torch, gyrodrop
        layer = gyrodrop.BlockGyroLinear(64, 8, p=0.5, block_size=16, steps_per_set=2)
        layer(torch.randn(4, 64))
        try:
            gyrodrop.BlockGyroLinear(64, 8, p=0.5, block_size=16, backend="triton")
        except ValueError as e:
            assert "gyrodrop[triton]" in str(e), e
        else:
            raise AssertionError("no error")
        assert "triton" not in sys.modules
        print("ok")
        """
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_build_plan_leaves_out_empty_groups_and_checks_its_inputs() -> None:
    kept = torch.tensor([[0, 2], [1, 3], [0, 1]])
    plan = bt.build_plan(kept, [2, 0, 3], 2, n_blocks=4, block_size=8, features=30, scale=2.0)
    assert plan.groups == 2
    assert plan.row_start.tolist() == [0, 4] and plan.row_count.tolist() == [4, 6]
    assert plan.keep.tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert plan.max_rows == 6 and plan.row_bounds == ((0, 4), (4, 6))
    assert plan.feature_keep(torch.float32).shape == (2, 30)
    with pytest.raises(ValueError, match="counts has 2 groups but kept has 3"):
        bt.build_plan(kept, [1, 1], 1, n_blocks=4, block_size=8, features=30, scale=2.0)
    with pytest.raises(ValueError, match="every row group is empty"):
        bt.build_plan(kept, [0, 0, 0], 1, n_blocks=4, block_size=8, features=30, scale=2.0)


def test_gpu_check_without_cuda_says_so_and_exits_zero(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@needs_triton
def test_triton_backend_under_torch_compile_matches_eager() -> None:
    """The kernel launches are a graph break; the rest compiles around them."""
    ref_layer, layer = _pair("input", "cpu")
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(5, 70)
    torch.testing.assert_close(compiled(x), ref_layer(x), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_backend_refuses_double_backward_clearly() -> None:
    _, layer = _pair("input", "cpu")
    x = torch.randn(4, 70, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
