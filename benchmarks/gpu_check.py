"""One-shot device check on a CUDA GPU: correctness first, then side-by-side bf16 timings.

    python benchmarks/gpu_check.py                    # everything, well under 8 minutes on an H200
    python benchmarks/gpu_check.py --quick            # small shapes, a smoke run
    python benchmarks/gpu_check.py --out results/gpu_check.md

Sections, in order (each one is skipped, and says so, when too little of ``--budget``
is left, so the script ends in time whatever happens):

1. **Checks on CUDA** (in this process): every gyrodrop layer on CUDA tensors against
   its dense reference: ``GyroDropout``, ``BlockGyroLinear`` (both placements, both
   backends, fp32 and bf16, odd sizes and uneven row groups, forward and gradients) and
   block-mode stochastic depth. The timings below use exactly these code paths.
2. **Benchmarks in bf16** (wall clock around synchronized loops, interleaved rounds,
   medians): ``GyroDropout`` vs ``nn.Dropout``; ``BlockGyroLinear`` (torch and Triton
   backends, both placements) vs ``nn.Dropout + nn.Linear`` and vs a dense
   ``nn.Linear``, forward and forward+backward, at 4096x4096 with batch 8192 and at the
   paper's 1024x1024 with batch 256, p = 0.1 / 0.25 / 0.5 / 0.75; an MLP training step;
   a stochastic-depth ResNet-18 training step; sample-mode stochastic depth on an
   8-layer transformer computing the kept rows only vs the multiply form (time, peak
   memory); each gyrodrop layer's model compiled (``fullgraph=True``, inductor, checked
   against eager) vs eager. The first call of each Triton shape
   autotunes (compiles and times every tile config): the warm-up rounds absorb it.
3. A ``torch.profiler`` table of Triton forward+backward (where the time goes).
4. **pytest**: the CUDA cases of ``tests/test_blockwise_triton.py`` (the compiled
   kernels vs the dense reference on many small odd shapes) with the time left; last,
   because compiling those shapes takes minutes.

Everything is written as Markdown to ``--out`` (and printed). On a machine without a
CUDA device it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.blockwise import triton_backend as blockwise_triton  # noqa: E402
from timing import markdown_table  # noqa: E402

PS = (0.1, 0.25, 0.5, 0.75)
# "cuda"; "cpu" only for --cpu-smoke (a tiny dry run of every section, Triton rows in
# Triton's interpreter: it checks the script, it measures nothing)
DEVICE = torch.device("cuda")
SMOKE = False


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Budget:
    """Seconds left of the run; sections check it before they start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need: float, what: str, report: list[str]) -> bool:
        if self.left() >= need:
            return True
        report.append(f"\n_{what}: skipped, {self.left():.0f} s left of the budget._\n")
        print(report[-1], flush=True)
        return False


def cuda_medians(
    variants: dict[str, Callable[[], object]], repeats: int, inner: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each variant: ``inner`` calls between two
    synchronizations, variants in interleaved rounds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------------------
# 1. correctness on CUDA


def run_pytest(report: list[str], budget: Budget) -> bool:
    timeout = max(30.0, budget.left() - 10)
    cmd = [sys.executable, "-m", "pytest", "tests/test_blockwise_triton.py", "-q", "-x"]
    cmd += ["-p", "no:cacheprovider", "-k", "cuda or backend or plan"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    start = time.monotonic()
    try:
        out = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        ok = out.returncode == 0
    except subprocess.TimeoutExpired:
        tail, ok = [f"timed out after {timeout:.0f} s"], False
    report.append(
        f"### pytest (CUDA cases of tests/test_blockwise_triton.py): "
        f"{'passed' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s\n\n```\n"
        + "\n".join(tail)
        + "\n```\n"
    )
    print(report[-1], flush=True)
    return ok


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Max error relative to the reference's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) / tol


def check_layers(report: list[str]) -> bool:
    """Every gyrodrop layer on CUDA tensors vs its dense reference."""
    dev = DEVICE
    rows: list[list[object]] = []
    ok = True

    def add(name: str, worst: float) -> None:
        nonlocal ok
        passed = worst <= 1.0
        ok &= passed
        rows.append([name, f"{worst:.2f}", "ok" if passed else "**FAIL**"])

    gen = torch.Generator(device=dev).manual_seed(0)
    # GyroDropout: the output is x times the dense mask of its row groups, and so is dx
    drop = gyrodrop.GyroDropout(0.5, num_subnets=16, subnets_per_step=4, steps_per_set=3).to(dev)
    worst = 0.0
    for _ in range(4):
        x = torch.randn(66, 256, device=dev, generator=gen, requires_grad=True)
        masks = drop.active_masks(x)
        counts = torch.tensor(drop._group_counts(66), device=dev)
        mask = masks[torch.repeat_interleave(torch.arange(len(counts), device=dev), counts)]
        y = drop(x)
        (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
        worst = max(worst, _close(y, x * mask, 1e-6), _close(dx, mask, 1e-6))
    add("GyroDropout fwd+grad (fp32)", worst)
    # odd sizes: shorter last blocks, uneven row groups (tau = 3)
    fin, fout, batch = (100, 70, 31) if SMOKE else (1000, 600, 301)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for prune in ("input", "output"):
            for backend in ("torch", "triton"):
                torch.manual_seed(0)
                layer = gyrodrop.BlockGyroLinear(
                    fin,
                    fout,
                    p=0.5,
                    num_subnets=16,
                    subnets_per_step=3,
                    steps_per_set=2,
                    prune=prune,
                    backend=backend,
                    device=dev,
                    dtype=dtype,
                )
                worst = 0.0
                for _ in range(3):
                    x = torch.randn(batch, fin, device=dev, generator=gen).to(dtype)
                    x.requires_grad_()
                    mask = layer.dense_mask(batch, device=dev, dtype=torch.float64)
                    w, b = layer.weight, layer.bias
                    xr = x.detach().double().requires_grad_()
                    wr = w.detach().double().requires_grad_()
                    br = b.detach().double().requires_grad_()
                    if prune == "input":
                        ref = F.linear(xr * mask, wr, br)
                    else:
                        ref = F.linear(xr, wr, br) * mask
                    y = layer(x)
                    dy = torch.randn(y.shape, device=dev, generator=gen).to(dtype)
                    got = torch.autograd.grad(y, [x, w, b], dy)
                    want = torch.autograd.grad(ref, [xr, wr, br], dy.double())
                    worst = max(worst, _close(y, ref, tol))
                    worst = max(worst, *(_close(g, r, tol) for g, r in zip(got, want, strict=True)))
                add(f"BlockGyroLinear {prune} {backend} fwd+grads ({dtype})", worst)
    # stochastic depth: a block-mode ResNet step runs and its gradients are finite
    from gyrodrop.experiments.models import ResNet18

    torch.manual_seed(0)
    model = ResNet18((3, 32, 32), (512,), 10, 0.0, base=16).to(dev)
    gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, seed=1)
    xs = torch.randn(8, 3, 32, 32, device=dev)
    F.cross_entropy(model(xs), torch.zeros(8, dtype=torch.long, device=dev)).backward()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    add("stochastic depth ResNet-18 step (finite grads)", 0.0 if finite else 2.0)
    report.append(
        "### Layers on CUDA vs dense references (error / tolerance, <= 1 passes)\n\n"
        + markdown_table(["check", "error / tol", "result"], rows)
        + "\n"
    )
    print(report[-1], flush=True)
    return ok


# --------------------------------------------------------------------------------------
# 2. benchmarks


def fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        module(x).backward(dy)

    return run


def bench_dropout(report: list[str], quick: bool, repeats: int) -> None:
    dev = DEVICE
    batch, features = (1024, 1024) if quick else (8192, 4096)
    if SMOKE:
        batch, features = 32, 64
    x = torch.randn(batch, features, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    rows: list[list[object]] = []
    for p in PS:
        mods = {
            "nn.Dropout": nn.Dropout(p),
            "GyroDropout": gyrodrop.GyroDropout(
                p, num_subnets=256, subnets_per_step=16, steps_per_set=100
            ),
        }
        for m in mods.values():
            m.to(dev).train()
        times = cuda_medians(
            {
                **{f"{k} fwd": fwd(m, x) for k, m in mods.items()},
                **{f"{k} fwd+bwd": fwd_bwd_input(m, x, dy) for k, m in mods.items()},
            },
            repeats,
            10,
        )
        for mode in ("fwd", "fwd+bwd"):
            a, b = times[f"nn.Dropout {mode}"], times[f"GyroDropout {mode}"]
            rows.append([p, mode, f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{a / b:.2f}x"])
    report.append(
        f"### GyroDropout vs nn.Dropout, bf16, input {batch}x{features}\n\n"
        + markdown_table(["p", "pass", "nn.Dropout ms", "GyroDropout ms", "speed-up"], rows)
        + "\n"
    )
    print(report[-1], flush=True)


def fwd_bwd_input(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module(x).backward(dy)

    return run


def bench_layers(
    report: list[str], features: int, batch: int, repeats: int, budget: Budget
) -> None:
    dev, dt = DEVICE, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(batch, features, device=dev, dtype=dt)
    dy = torch.randn(batch, features, device=dev, dtype=dt)
    dense = nn.Linear(features, features, device=dev, dtype=dt)
    rows: list[list[object]] = []
    for p in PS:
        if not budget.allows(45, f"{features}x{features} batch {batch} p={p}", report):
            break
        variants: dict[str, nn.Module] = {
            "nn.Linear": dense,
            "nn.Dropout+nn.Linear": nn.Sequential(nn.Dropout(p), dense),
        }
        for backend in ("torch", "triton"):
            for prune in ("input", "output"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    layer = gyrodrop.BlockGyroLinear.from_linear(
                        dense,
                        p=p,
                        num_subnets=256,
                        subnets_per_step=2,
                        steps_per_set=100,
                        prune=prune,
                        backend=backend,
                    )
                variants[f"block {backend} ({prune})"] = layer.train()
        for m in variants.values():
            m.train()
        for mode in ("fwd", "fwd+bwd"):
            calls = {
                name: fwd(m, x) if mode == "fwd" else fwd_bwd(m, x, dy)
                for name, m in variants.items()
            }
            times = cuda_medians(calls, repeats, 5)
            base = times["nn.Dropout+nn.Linear"]
            dense_t = times["nn.Linear"]
            for name, t in times.items():
                rows.append(
                    [
                        p,
                        mode,
                        name,
                        f"{t * 1e3:.3f}",
                        f"{base / t:.2f}x",
                        f"{dense_t / t:.2f}x",
                    ]
                )
    report.append(
        f"### Layer {features}x{features}, batch {batch}, bf16, tau=2, block 32\n\n"
        + markdown_table(
            ["p", "pass", "variant", "ms", "vs Dropout+Linear", "vs dense Linear"], rows
        )
        + "\n"
    )
    print(report[-1], flush=True)


def make_mlp(sizes: tuple[int, ...], p: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers)


def bench_mlp(report: list[str], quick: bool, repeats: int) -> None:
    dev, dt = DEVICE, torch.bfloat16
    sizes = (784, 1024, 1024, 10) if quick else (784, 4096, 4096, 4096, 10)
    batch, p = (256, 0.5) if quick else (8192, 0.5)
    if SMOKE:
        sizes, batch = (32, 64, 64, 10), 32
    torch.manual_seed(0)
    base = make_mlp(sizes, p).to(dev, dt)
    models: dict[str, nn.Module] = {"nn.Dropout": base, "no dropout": make_mlp(sizes, 0.0)}
    models["no dropout"].load_state_dict(base.state_dict())
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_block_gyro(
                model,
                num_subnets=256,
                subnets_per_step=2,
                total_steps=12800,
                prune="auto",
                backend=backend,
            )
        models[f"block-wise gyro ({backend})"] = model
    x = torch.randn(batch, sizes[0], device=dev, dtype=dt)
    y = torch.randint(0, sizes[-1], (batch,), device=dev)
    steps = {}
    for name, m in models.items():
        m.to(dev, dt).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def run(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x).float(), y).backward()
            opt.step()

        steps[name] = run
    times = cuda_medians(steps, repeats, 3)
    ref = times["nn.Dropout"]
    rows = [[n, f"{t * 1e3:.2f}", f"{ref / t:.2f}x"] for n, t in times.items()]
    report.append(
        f"### MLP {'-'.join(map(str, sizes))} training step, bf16, batch {batch}, p={p}, "
        "SGD (block-wise: prune='auto', tau=2)\n\n"
        + markdown_table(["model", "ms / step", "speed-up vs nn.Dropout"], rows)
        + "\n"
    )
    print(report[-1], flush=True)


def bench_resnet(report: list[str], quick: bool, repeats: int) -> None:
    from gyrodrop.experiments.models import ResNet18

    dev = DEVICE
    batch, width = (32, 16) if quick else (256, 64)
    if SMOKE:
        batch, width = 4, 8
    torch.manual_seed(0)
    base = ResNet18((3, 32, 32), (512,), 10, 0.0, base=width)
    models: dict[str, nn.Module] = {"no stochastic depth": base}
    for dist in ("linear", "uniform"):
        m = copy.deepcopy(base)
        gyrodrop.apply_stochastic_depth(m, drop_rate=0.5, drop_distribution=dist, seed=1)
        models[f"block, {dist}, drop_rate=0.5"] = m
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    steps = {}
    for name, m in models.items():
        m.to(dev).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)

        def run(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()

        steps[name] = run
    times = cuda_medians(steps, repeats, 3)
    ref = times["no stochastic depth"]
    rows = [[n, f"{t * 1e3:.2f}", f"{ref / t:.2f}x"] for n, t in times.items()]
    report.append(
        f"### ResNet-18 (width {width}) training step, bf16 autocast, batch {batch}x3x32x32\n\n"
        + markdown_table(["stochastic depth", "ms / step", "speed-up"], rows)
        + "\n"
    )
    print(report[-1], flush=True)


def bench_sd_skip(report: list[str], quick: bool, repeats: int) -> None:
    """Sample-mode stochastic depth computing the kept rows only vs the multiply form
    (every row) vs none vs block mode: an 8-layer transformer stack training step in
    bf16 autocast, with the peak memory of each step (``max_memory_allocated``)."""
    from bench_compile import Stack, sd_variants

    dev = DEVICE
    d, batch, tokens = (64, 16, 16) if quick else (256, 64, 128)
    if SMOKE:
        d, batch, tokens = 32, 8, 8
    torch.manual_seed(0)
    nets = sd_variants(Stack(8, d))
    x = torch.randn(batch, tokens, d, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    steps, peaks = {}, {}
    for name, net in nets.items():
        net.to(dev).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def run(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()

        run()  # learns the layers' output structure; allocates the optimizer state
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            run()
            sync()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        steps[name] = run
    times = cuda_medians(steps, repeats, 3)
    ref = times["none"]
    rows = [
        [n, f"{t * 1e3:.2f}", f"{ref / t:.2f}x", f"{peaks.get(n, float('nan')):.0f}"]
        for n, t in times.items()
    ]
    report.append(
        f"### Sample-mode stochastic depth, 8-layer transformer (d={d}, {tokens} tokens, "
        f"batch {batch}), bf16 autocast training step\n\n"
        + markdown_table(["variant", "ms / step", "speed-up vs none", "peak MiB"], rows)
        + "\n"
    )
    print(report[-1], flush=True)


def bench_compiled(report: list[str], quick: bool, repeats: int) -> bool:
    """Each gyrodrop layer's model, eager vs ``torch.compile(fullgraph=True)``
    (inductor): the compiled outputs checked against eager at the same steps, then
    the training step timed side by side, with dynamo's graph and break counts."""
    from torch._dynamo.utils import counters

    from bench_compile import BLOCK_MODE, compile_models

    ok = True
    rows = []
    for name, (net, x) in compile_models(quick or SMOKE).items():
        torch.manual_seed(0)
        eager = copy.deepcopy(net).to(DEVICE)
        twin = copy.deepcopy(net).to(DEVICE)
        x = x.to(DEVICE)
        y = torch.randint(0, 10, (x.shape[0],), device=DEVICE)
        torch._dynamo.reset()
        counters.clear()
        backend = "aot_eager" if SMOKE else "inductor"
        compiled = torch.compile(twin, backend=backend, fullgraph=name != BLOCK_MODE)
        err = 0.0
        for _ in range(4):  # steps 0-3: the active set changes at step 3
            err = max(err, _close(compiled(x), eager(x), 1.0))
        ok &= err <= 1e-3
        opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (eager, twin)]

        def step(
            m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
        ) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        times = cuda_medians(
            {
                "eager": lambda e=eager, o=opts[0], x=x, y=y: step(e, o, x, y),
                "compiled": lambda c=compiled, o=opts[1], x=x, y=y: step(c, o, x, y),
            },
            repeats,
            3,
        )
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        rows.append(
            [
                name,
                f"{err:.1e}",
                f"{times['eager'] * 1e3:.2f}",
                f"{times['compiled'] * 1e3:.2f}",
                f"{times['eager'] / times['compiled']:.2f}x",
                f"{graphs} / {breaks}",
            ]
        )
    report.append(
        f"### Compiled ({'aot_eager' if SMOKE else 'inductor'}, fullgraph) vs eager "
        "training step, float32\n\n"
        + markdown_table(
            [
                "model with",
                "max err vs eager",
                "eager ms",
                "compiled ms",
                "speed-up",
                "graphs / breaks",
            ],
            rows,
        )
        + "\n"
    )
    print(report[-1], flush=True)
    return ok


def profile_triton(report: list[str], features: int, batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    dev, dt = DEVICE, torch.bfloat16
    layer = gyrodrop.BlockGyroLinear(
        features, features, p=0.5, steps_per_set=100, backend="triton", device=dev, dtype=dt
    )
    x = torch.randn(batch, features, device=dev, dtype=dt)
    dy = torch.randn(batch, features, device=dev, dtype=dt)
    run = fwd_bwd(layer, x, dy)
    for _ in range(3):
        run()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not SMOKE else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            run()
        sync()
    sort = "cpu_time_total" if SMOKE else "cuda_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=12)
    report.append(
        f"### torch.profiler: 5 x Triton fwd+bwd, {features}x{features}, batch {batch}, "
        f"p=0.5, bf16\n\n```\n{table}\n```\n"
    )
    print(report[-1], flush=True)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--out", default="results/gpu_check.md", help="Markdown report")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="dry-run every section on the CPU at toy sizes (Triton in its interpreter)",
    )
    args = parser.parse_args(argv)
    global DEVICE, SMOKE
    if args.cpu_smoke:
        DEVICE, SMOKE = torch.device("cpu"), True
        os.environ["TRITON_INTERPRET"] = "1"
        args.quick = True
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to do.")
        return 0
    budget = Budget(args.budget)
    name = "CPU smoke run (no timings)" if SMOKE else torch.cuda.get_device_name(0)
    report = [
        "## gyrodrop GPU check\n",
        f"{name}, torch {torch.__version__}, "
        f"triton {_triton_version()}, CUDA {torch.version.cuda}, Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
    ]
    print(report[-1], flush=True)
    if not blockwise_triton.is_available():
        report.append("_triton is not installed: the Triton rows are skipped._\n")
    ok = True
    if not args.skip_tests:
        try:
            ok &= check_layers(report)
        except Exception as exc:  # noqa: BLE001 - report it and carry on to the timings
            ok = False
            report.append(f"\n**layer checks failed**: `{type(exc).__name__}: {exc}`\n")
            print(report[-1], flush=True)
    repeats = 3 if args.quick else args.repeats
    shapes = [(1024, 256)] if args.quick else [(4096, 8192), (1024, 256)]
    if SMOKE:
        repeats, shapes = 1, [(256, 32)]
    compiled_ok: list[bool] = []
    sections: list[tuple[float, str, Callable[[], None]]] = [
        (20, "GyroDropout vs nn.Dropout", lambda: bench_dropout(report, args.quick, repeats)),
        *[
            (
                60,
                f"layers {f}x{f} batch {b}",
                lambda f=f, b=b: bench_layers(report, f, b, repeats, budget),
            )
            for f, b in shapes
        ],
        (30, "MLP training step", lambda: bench_mlp(report, args.quick, repeats)),
        (30, "ResNet-18 step", lambda: bench_resnet(report, args.quick, repeats)),
        (30, "sample-mode skip", lambda: bench_sd_skip(report, args.quick, repeats)),
        (
            90,
            "compiled step",
            lambda: compiled_ok.append(bench_compiled(report, args.quick, repeats)),
        ),
        (15, "profile", lambda: profile_triton(report, *shapes[0])),
    ]
    for need, what, section in sections:
        if budget.allows(need, what, report):
            try:
                section()
            except Exception as exc:  # noqa: BLE001 - report it and carry on
                ok = False
                report.append(f"\n**{what} failed**: `{type(exc).__name__}: {exc}`\n")
                print(report[-1], flush=True)
    ok &= all(compiled_ok)
    # the pytest run last: compiling its many small odd shapes takes minutes, and the
    # in-process checks above already validated the kernels the timings use
    if not args.skip_tests and not SMOKE and budget.allows(60, "pytest CUDA cases", report):
        ok &= run_pytest(report, budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print(f"\nwritten: {out} ({'all checks passed' if ok else 'SOME CHECKS FAILED'})")
    return 0 if ok else 1


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
