"""Sample-mode stochastic depth that skips the dropped rows, and compiled training steps.

    python benchmarks/bench_compile.py --threads 1            # the README tables
    python benchmarks/bench_compile.py --quick                # a seconds-long smoke run
    python benchmarks/bench_compile.py --skip-compile         # the first table only

1. **Skip vs multiply.** An 8-layer pre-norm ``nn.TransformerEncoder`` (``--d`` 128,
   4 heads, feed-forward ``4 d``, ``--tokens`` 16 tokens, dropout 0) and a linear head,
   a training step (AdamW, cross-entropy) on a batch of ``--batch`` 64 random
   sequences. Variants, from the same weights: no stochastic depth; sample mode
   ``p = 0.5`` uniform computing each layer on the kept rows only (random rows, and a
   fixed count of rows per step); sample mode in the multiply form (every row
   computed, dropped rows multiplied by 0: what gyrodrop 0.1 did); block mode
   ``p = 0.5`` uniform. "step ms": median of interleaved rounds (``timing.py``);
   "activations MiB": the bytes autograd saves for the backward in one forward (every
   distinct storage counted once, through ``torch.autograd.graph.saved_tensors_hooks``:
   the activation memory a training step holds at its peak).
2. **Compiled vs eager.** For each gyrodrop layer, a small model around it (an MLP, a
   conv net, a transformer stack), one training step eager and under
   ``torch.compile(fullgraph=True)`` (``--backend``, default inductor), side by side;
   the graph count and graph breaks over the timed steps come from
   ``torch._dynamo`` counters.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.stochastic_depth import StochasticDepthLayer  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402
from training import train_step  # noqa: E402


class Stack(nn.Module):
    """(B, T, d) tokens -> an ``nn.TransformerEncoder`` -> mean pool -> 10 classes."""

    def __init__(self, layers: int, d: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _multiply_form(net: nn.Module) -> nn.Module:
    """Sample mode as gyrodrop 0.1 computed it: every row, dropped rows times 0."""
    for m in net.modules():
        if isinstance(m, StochasticDepthLayer):
            m._skippable = lambda *args: False  # type: ignore[method-assign]
    return net


def sd_variants(base: nn.Module) -> dict[str, nn.Module]:
    def sd(mode: str, kept_rows: str = "random") -> nn.Module:
        net = copy.deepcopy(base)
        gyrodrop.apply_stochastic_depth(
            net, drop_rate=0.5, drop_distribution="uniform", mode=mode, seed=1
        )
        for m in net.modules():
            if isinstance(m, gyrodrop.StochasticDepth):
                m.kept_rows = kept_rows
        return net

    return {
        "none": copy.deepcopy(base),
        "sample 0.5, skip (random rows)": sd("sample"),
        "sample 0.5, skip (fixed rows)": sd("sample", "fixed"),
        "sample 0.5, multiply (0.1 form)": _multiply_form(sd("sample")),
        "block 0.5": sd("block"),
    }


def saved_bytes(net: nn.Module, x: Tensor, y: Tensor) -> int:
    """Bytes autograd saves for the backward in one training forward (each storage
    once)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    net.zero_grad(set_to_none=True)
    return sum(seen.values())


def skip_table(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    base = Stack(8, args.d)
    x = torch.randn(args.batch, args.tokens, args.d)
    y = torch.randint(0, 10, (args.batch,))
    nets = sd_variants(base)
    steps: dict[str, Callable[[], object]] = {}
    for name, net in nets.items():
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        train_step(net, opt, x, y)  # learns the layers' output structure
        steps[name] = lambda net=net, opt=opt: train_step(net, opt, x, y)
    memory = {name: saved_bytes(net, x, y) for name, net in nets.items()}
    repeats, inner = (3, 1) if args.quick else (7, 5)
    times = interleaved_medians(steps, repeats=repeats, inner=inner, warmup=1)
    rows = [
        [
            name,
            f"{1000 * times[name]:.1f}",
            f"{times['none'] / times[name]:.2f}x",
            f"{memory[name] / 2**20:.1f}",
        ]
        for name in nets
    ]
    head = (
        f"8-layer transformer stack, d={args.d}, {args.tokens} tokens, batch {args.batch}, "
        f"training step, threads={torch.get_num_threads()}\n\n"
    )
    return head + markdown_table(
        ["variant", "step ms", "speed-up vs none", "activations MiB"], rows
    )


# --------------------------------------------------------------------------------------
# Compiled vs eager, one model per gyrodrop layer.


def _mlp(layer: nn.Module, d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), layer, nn.Linear(d, 10))


#: The row compiled without ``fullgraph`` (block mode decides on the host: a graph break).
BLOCK_MODE = "StochasticDepth (block mode; fullgraph=False)"


def compile_models(quick: bool) -> dict[str, tuple[nn.Module, Tensor]]:
    d, b = (64, 32) if quick else (512, 256)
    c, hw = (8, 8) if quick else (32, 16)
    kw: dict[str, Any] = {"num_subnets": 16, "steps_per_set": 3}
    convnet = lambda drop: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), drop, nn.Flatten(), nn.Linear(c * hw * hw, 10)
    )
    img = torch.randn(b // 4, 3, hw, hw)
    width = 64 if quick else 128
    stack = Stack(4, width)
    gyrodrop.apply_stochastic_depth(stack, 0.5, "uniform", "sample", seed=1, kept_rows="fixed")
    block_stack = Stack(4, width)
    gyrodrop.apply_stochastic_depth(block_stack, 0.5, "uniform", "block", seed=1)
    tokens = torch.randn(b // 4, 16, width)
    block = gyrodrop.BlockGyroLinear(d, d, p=0.5, block_size=16, subnets_per_step=2, **kw)
    models = {
        "GyroDropout": (_mlp(gyrodrop.GyroDropout(0.5, subnets_per_step=4, **kw), d), None),
        "BlockGyroLinear": (
            nn.Sequential(nn.Linear(d, d), nn.ReLU(), block, nn.Linear(d, 10)),
            None,
        ),
        "DropBlock2d": (convnet(gyrodrop.DropBlock2d(0.1, 3)), img),
        "GyroDropBlock2d": (convnet(gyrodrop.GyroDropBlock2d(0.1, 3, 16, 4, steps_per_set=3)), img),
        "StochasticDepth (sample, fixed rows)": (stack, tokens),
        BLOCK_MODE: (block_stack, tokens),
    }
    out = {}
    for name, (net, x) in models.items():
        gyrodrop.stepping.attach_stepper(net)
        out[name] = (net, torch.randn(b, d) if x is None else x)
    return out


def compile_table(args: argparse.Namespace) -> str:
    from torch._dynamo.utils import counters

    rows = []
    for name, (net, x) in compile_models(args.quick).items():
        torch.manual_seed(0)
        y = torch.randint(0, 10, (x.shape[0],))
        eager = copy.deepcopy(net)
        compiled_module = copy.deepcopy(net)
        torch._dynamo.reset()
        counters.clear()
        fullgraph = name != BLOCK_MODE
        compiled = torch.compile(compiled_module, backend=args.backend, fullgraph=fullgraph)
        opt_e = torch.optim.SGD(eager.parameters(), lr=1e-3)
        opt_c = torch.optim.SGD(compiled_module.parameters(), lr=1e-3)
        steps: dict[str, Callable[[], object]] = {
            "eager": lambda e=eager, o=opt_e, x=x, y=y: train_step(e, o, x, y),
            "compiled": lambda c=compiled, o=opt_c, x=x, y=y: train_step(c, o, x, y),
        }
        try:
            steps["compiled"]()  # compiles
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a result too
            rows.append([name, "", f"failed: {type(exc).__name__}", "", "", ""])
            print(rows[-1], flush=True)
            continue
        repeats, inner = (3, 1) if args.quick else (7, 3)
        times = interleaved_medians(steps, repeats=repeats, inner=inner, warmup=1)
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        rows.append(
            [
                name,
                f"{1000 * times['eager']:.2f}",
                f"{1000 * times['compiled']:.2f}",
                f"{times['eager'] / times['compiled']:.2f}x",
                f"{graphs} / {breaks}",
                int(compiled_module.get_submodule(_first_gyro(compiled_module)).step),
            ]
        )
        print(rows[-1], flush=True)
    head = f"compiled (backend={args.backend}, fullgraph=True) vs eager training step\n\n"
    return head + markdown_table(
        ["model with", "eager ms", "compiled ms", "speed-up", "graphs / breaks", "steps run"],
        rows,
    )


def _first_gyro(net: nn.Module) -> str:
    return next(n for n, m in net.named_modules() if isinstance(m, gyrodrop.schedule.SteppedModule))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--d", type=int, default=128, help="transformer width")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--skip-compile", action="store_true", help="only the first table")
    parser.add_argument("--only-compile", action="store_true", help="only the second table")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d, args.batch = 64, 16
    if not args.only_compile:
        print(skip_table(args), flush=True)
    if not args.skip_compile:
        print("\n" + compile_table(args), flush=True)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
