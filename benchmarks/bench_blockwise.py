"""Block-wise gyro dropout with pruned GEMMs vs nn.Dropout + nn.Linear, side by side.

    python benchmarks/bench_blockwise.py            # the full run (a few minutes)
    python benchmarks/bench_blockwise.py --quick    # a seconds-long smoke run

Part 1, one layer (in = out = 1024, batch 256, 2 row groups, input pruning): fwd+bwd of
``BlockGyroLinear`` against ``nn.Dropout`` + ``nn.Linear`` and against a dense
``nn.Linear`` at p = 0.1 / 0.25 / 0.5 / 0.75, the forward-only ratio against the dense
layer (the paper's Table 7: 1.09 / 1.24 / 1.58 / 2.80x on a GPU), the GEMM FLOPs
counted by ``torch.utils.flop_counter`` and the ideal speed-up if only the GEMM work
fell (to ``1 - p``) and dropout cost nothing (derived from the measured times:
Dropout+Linear / ((1 - p) x Linear), not measured itself).

Part 2, end to end: one training step (forward, cross-entropy, backward, RMSprop) of a
784-2048-2048-10 MLP with ReLU and dropout after each hidden layer, batch 256, with
``nn.Dropout`` against the same model after ``gyrodrop.apply_block_gyro``.

The compared variants run in interleaved rounds (A, B, C, A, B, C, ...) and the tables
report medians, so the ratios hold on a noisy, shared machine; absolute times are only
indicative.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402


@dataclass
class LayerConfig:
    batch: int = 256
    features: int = 1024  # in = out
    groups: int = 2  # subnets_per_step: row groups of the batch
    block_size: int = 32
    ps: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    num_subnets: int = 256
    steps_per_set: int = 100  # masks change every 100 steps, as in a real run


@dataclass
class MLPConfig:
    sizes: tuple[int, ...] = (784, 2048, 2048, 10)
    p: float = 0.5
    batch: int = 256
    lr: float = 1e-4


@dataclass
class BenchConfig:
    threads: int = 2
    repeats: int = 41  # interleaved rounds (A, B, C, A, B, C, ...), medians over them
    inner: int = 3  # calls per timed sample: short samples interleave finely
    layer: LayerConfig = field(default_factory=LayerConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)


def gemm_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products run by ``fn`` (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    return run


def fwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


def bench_layer(cfg: BenchConfig) -> str:
    lc = cfg.layer
    b, f = lc.batch, lc.features
    torch.manual_seed(0)
    x = torch.randn(b, f, requires_grad=True)
    dy = torch.randn(b, f)
    linear = nn.Linear(f, f)
    rows, out_rows = [], []
    for p in lc.ps:
        options = {
            "num_subnets": lc.num_subnets,
            "subnets_per_step": lc.groups,
            "block_size": lc.block_size,
            "steps_per_set": lc.steps_per_set,
            "workspace": True,  # scratch reused across steps, as measured in the README
        }
        block = gyrodrop.BlockGyroLinear.from_linear(linear, p=p, **options)
        block_out = gyrodrop.BlockGyroLinear.from_linear(linear, p=p, prune="output", **options)
        dropout_linear = nn.Sequential(nn.Dropout(p), linear)
        linear_dropout = nn.Sequential(linear, nn.Dropout(p))
        times = interleaved_medians(
            {
                "drop+linear": fwd_bwd(dropout_linear, x, dy),
                "linear": fwd_bwd(linear, x, dy),
                "block": fwd_bwd(block, x, dy),
                "linear+drop": fwd_bwd(linear_dropout, x, dy),
                "block out": fwd_bwd(block_out, x, dy),
                "linear fwd": fwd(linear, x),
                "block fwd": fwd(block, x),
            },
            cfg.repeats,
            cfg.inner,
        )
        flops_block = gemm_flops(fwd_bwd(block, x, dy))
        flops_dense = gemm_flops(fwd_bwd(linear, x, dy))
        ideal = times["drop+linear"] / ((1 - block.effective_p) * times["linear"])
        rows.append(
            [
                f"{p:g}",
                f"{block.effective_p:.3f}",
                f"{times['drop+linear'] * 1e3:.2f}",
                f"{times['linear'] * 1e3:.2f}",
                f"{times['block'] * 1e3:.2f}",
                f"**{times['drop+linear'] / times['block']:.2f}x**",
                f"{times['linear'] / times['block']:.2f}x",
                f"{times['linear fwd'] / times['block fwd']:.2f}x",
                f"{flops_block / flops_dense:.1%}",
                f"{ideal:.2f}x",
            ]
        )
        out_rows.append(
            [
                f"{p:g}",
                f"{times['linear+drop'] * 1e3:.2f}",
                f"{times['block out'] * 1e3:.2f}",
                f"**{times['linear+drop'] / times['block out']:.2f}x**",
                f"{times['block'] / times['block out']:.2f}x",
            ]
        )
    header = [
        "p",
        "p_eff",
        "Dropout+Linear ms",
        "Linear ms",
        "BlockGyroLinear ms",
        "vs Dropout+Linear",
        "vs Linear",
        "fwd only vs Linear",
        "GEMM FLOPs",
        "ideal (derived)",
    ]
    title = (
        f"One layer, fwd+bwd: in=out={f}, batch {b}, {lc.groups} row groups, block "
        f"{lc.block_size}, input pruning ({cfg.threads} threads, torch {torch.__version__})"
    )
    out_header = [
        "p",
        "Linear+Dropout ms",
        "BlockGyroLinear(prune='output') ms",
        "vs Linear+Dropout",
        "output vs input pruning",
    ]
    out_title = "Same layer, output pruning (dropout after the Linear), same run"
    return (
        f"{title}\n\n{markdown_table(header, rows)}\n\n"
        f"{out_title}\n\n{markdown_table(out_header, out_rows)}"
    )


def make_mlp(mc: MLPConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    sizes = mc.sizes
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(mc.p)]
    return nn.Sequential(*layers)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def bench_mlp(cfg: BenchConfig) -> str:
    mc = cfg.mlp
    torch.manual_seed(0)
    x = torch.randn(mc.batch, mc.sizes[0])
    y = torch.randint(0, mc.sizes[-1], (mc.batch,))
    models: dict[str, nn.Module] = {"nn.Dropout": make_mlp(mc)}
    for prune in ("input", "auto"):
        model = make_mlp(mc)
        model.load_state_dict(models["nn.Dropout"].state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_block_gyro(
                model,
                num_subnets=256,
                subnets_per_step=2,
                total_steps=12800,
                prune=prune,
                workspace=True,
            )
        models[f"block-wise ({prune})"] = model
    no_dropout = make_mlp(MLPConfig(mc.sizes, 0.0, mc.batch, mc.lr))
    models["no dropout"] = no_dropout
    steps = {
        name: train_step(m, torch.optim.RMSprop(m.parameters(), lr=mc.lr), x, y)
        for name, m in models.items()
    }
    times = interleaved_medians(steps, cfg.repeats, 1)
    flops = {name: gemm_flops(step) for name, step in steps.items()}
    base = times["nn.Dropout"]
    rows = [
        [name, f"{t * 1e3:.1f}", f"**{base / t:.2f}x**", f"{flops[name] / flops['nn.Dropout']:.1%}"]
        for name, t in times.items()
    ]
    title = (
        f"MLP {'-'.join(map(str, mc.sizes))}, ReLU + dropout p={mc.p} after each hidden "
        f"layer, batch {mc.batch}, RMSprop, one training step ({cfg.threads} threads)"
    )
    header = ["model", "ms / step", "speed-up vs nn.Dropout", "GEMM FLOPs"]
    return title + "\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny repetition counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--part", choices=("layer", "mlp", "all"), default="all")
    args = parser.parse_args(argv)
    cfg = BenchConfig(threads=args.threads)
    if args.quick:  # small sizes, one round: checks that everything runs
        cfg.repeats, cfg.inner = 1, 1
        cfg.layer = LayerConfig(batch=64, features=256, ps=(0.5,))
        cfg.mlp = MLPConfig(sizes=(64, 256, 256, 10), batch=64)
    if args.repeats is not None:
        cfg.repeats = args.repeats
    torch.set_num_threads(cfg.threads)
    if args.part in ("layer", "all"):
        print(bench_layer(cfg), end="\n\n")
    if args.part in ("mlp", "all"):
        print(bench_mlp(cfg))


if __name__ == "__main__":
    main()
