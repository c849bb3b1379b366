"""ResNet-18 training step with and without block-mode stochastic depth, side by side.

    python benchmarks/bench_stochastic_depth.py            # CIFAR ResNet-18, batch 32, 32x32
    python benchmarks/bench_stochastic_depth.py --quick    # a seconds-long smoke run
    python benchmarks/bench_stochastic_depth.py --device cuda --batch 128

One step is forward, cross-entropy, backward and an SGD update. In block mode a dropped
residual branch is not computed at all (neither forward nor backward), so the step gets
cheaper in proportion to the share of branch work skipped: with ``drop_rate=0.5`` the
uniform distribution skips half the branches on average, the linear one (block ``i`` of
``L`` dropped with ``0.5 (i + 1) / L``) about 28% of them for ResNet-18's 8 blocks,
weighted towards the deep blocks. Sample mode computes every branch (no saving) and is
shown for reference.

Every variant starts from the same weights; the variants run in interleaved rounds and
medians are reported (see ``timing.py``). "branches computed" is measured: forward hooks
count the residual branches that actually ran (each block's ``conv1``) against the
branches of every training forward run (blocks x forwards, warm-up steps included).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.experiments.models import BasicBlock, ResNet18  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402


class BranchCounter:
    """Counts, by forward hooks, the residual branches computed (a block's ``conv1`` runs
    exactly when its branch does) and the model's forwards."""

    def __init__(self, model: nn.Module) -> None:
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        self.blocks, self.branches, self.forwards = len(blocks), 0, 0
        for block in blocks:
            block.conv1.register_forward_hook(self._branch)
        model.register_forward_hook(self._forward)

    def _branch(self, *_: object) -> None:
        self.branches += 1

    def _forward(self, *_: object) -> None:
        self.forwards += 1

    def share(self) -> float:
        """Branches computed / branches of the forwards run (1.0 without SD)."""
        return self.branches / max(1, self.blocks * self.forwards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow net, tiny repetition counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--inner", type=int, default=4, help="training steps per timing")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.width, args.repeats, args.inner = 8, 16, 3, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = ResNet18((3, 32, 32), (512,), 10, 0.0, base=args.width)
    variants: dict[str, nn.Module] = {"no stochastic depth": base}
    for label, kw in {
        f"block, linear, drop_rate={args.drop_rate}": {"drop_distribution": "linear"},
        f"block, uniform, drop_rate={args.drop_rate}": {"drop_distribution": "uniform"},
        f"sample, uniform, drop_rate={args.drop_rate}": {
            "drop_distribution": "uniform",
            "mode": "sample",
        },
    }.items():
        model = copy.deepcopy(base)
        gyrodrop.apply_stochastic_depth(model, drop_rate=args.drop_rate, seed=1, **kw)
        variants[label] = model

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    def train_step(model: nn.Module):
        model.to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    counters = {name: BranchCounter(m) for name, m in variants.items()}
    steps = {name: train_step(m) for name, m in variants.items()}
    times = interleaved_medians(steps, args.repeats, args.inner, warmup=2)
    ref = times["no stochastic depth"]
    rows = [
        [
            name,
            f"{t * 1e3:.1f}",
            f"{ref / t:.2f}x",
            f"{counters[name].share():.0%}",
        ]
        for name, t in times.items()
    ]
    print(
        f"ResNet-18 (CIFAR, width {args.width}) training step, batch {args.batch} x 3 x 32 x 32, "
        f"{args.device}, {args.threads} threads, torch {torch.__version__}, "
        f"{args.repeats} x {args.inner} steps per variant"
    )
    header = ["stochastic depth", "median ms / step", "speed-up", "branches computed (counted)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
