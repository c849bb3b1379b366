"""Stochastic depth on a small transformer: training-step speed-up and accuracy.

    python benchmarks/bench_sd_transformer.py --threads 1   # the README table
    python benchmarks/bench_sd_transformer.py --quick       # a seconds-long smoke run

The model reads a Fashion-MNIST image as a sequence of its 28 rows (28 features each):
``Linear(28 -> d)`` plus learned positions, an ``nn.TransformerEncoder`` of ``--layers``
pre-norm layers (``d = 32``, 4 heads, feed-forward 64, dropout 0), mean pooling and a
linear head. :func:`gyrodrop.apply_stochastic_depth` finds the encoder's layers and wraps
them whole (:class:`gyrodrop.stochastic_depth.StochasticDepthLayer`): in block mode a
dropped layer is not computed, forward or backward.

Variants: no stochastic depth; ``drop_rate=0.5`` linear (layer ``i`` of ``L`` dropped
with ``0.5 (i + 1) / L``, the usual rule); ``0.5`` uniform. Every variant trains from the
same weights and batch order per seed (AdamW, cross-entropy) on a seeded subset and
reports the final test accuracy. "step ms" is the median time of one training step on
one batch, the variants timed in interleaved rounds (``timing.py``) with their
decisions running on; "layers computed" is the share of layer calls actually computed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from gyrodrop.experiments.data import load_dataset  # noqa: E402
from gyrodrop.stochastic_depth import StochasticDepthLayer, block_keep  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402
from training import accuracy, train_step  # noqa: E402

VARIANTS = {
    "none": None,
    "SD 0.5 linear": ("linear", 0.5),
    "SD 0.5 uniform": ("uniform", 0.5),
}


class RowTransformer(nn.Module):
    """Image rows as tokens: (B, 1, 28, 28) -> (B, 28, 28) -> (B, 10)."""

    def __init__(self, layers: int, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.pos = nn.Parameter(torch.zeros(1, 28, d))
        layer = nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.flatten(1, 2).reshape(-1, 28, 28)) + self.pos  # (B, 28, d)
        return self.head(self.norm(self.encoder(h)).mean(dim=1))


def build(name: str, base: nn.Module, seed: int) -> nn.Module:
    net = copy.deepcopy(base)
    spec = VARIANTS[name]
    if spec is not None:
        distribution, rate = spec
        gyrodrop.apply_stochastic_depth(
            net, drop_rate=rate, drop_distribution=distribution, seed=seed
        )
    return net


def computed_share(net: nn.Module) -> float:
    layers = [m for m in net.modules() if isinstance(m, StochasticDepthLayer)]
    if not layers:
        return 1.0
    kept = total = 0
    for layer in layers:
        sd = layer.stochastic_depth
        steps = sd.current_step()
        kept += sum(block_keep(sd.decision_seed(), s, sd.rate(s)) for s in range(steps))
        total += steps
    return kept / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subset, one epoch, one seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=6000, help="train and test examples")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limit, epochs = (512, 1) if args.quick else (args.limit, args.epochs)
    seeds = [0] if args.quick else list(range(args.seeds))
    data = load_dataset("fashion-mnist", args.data_dir, limit=limit)
    print(data.describe(), flush=True)
    steps_per_epoch = len(data.y_train) // args.batch

    acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        torch.manual_seed(seed)
        base = RowTransformer(args.layers)
        g = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(len(data.y_train), generator=g) for _ in range(epochs)]
        for name in VARIANTS:
            net = build(name, base, seed)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            for order in orders:
                for s in range(steps_per_epoch):
                    idx = order[s * args.batch : (s + 1) * args.batch]
                    train_step(net, opt, data.x_train[idx], data.y_train[idx])
            acc[name].append(accuracy(net, data.x_test, data.y_test, chunk=500))
            print(f"seed {seed} {name:15s} test accuracy {acc[name][-1]:.4f}", flush=True)

    torch.manual_seed(0)
    base = RowTransformer(args.layers)
    x, y = data.x_train[: args.batch], data.y_train[: args.batch]
    nets = {name: build(name, base, 0) for name in VARIANTS}
    steps: dict[str, Callable[[], object]] = {}
    for name, net in nets.items():
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        steps[name] = lambda net=net, opt=opt: train_step(net, opt, x, y)
    repeats, inner = (3, 2) if args.quick else (9, 10)
    times = interleaved_medians(steps, repeats=repeats, inner=inner, warmup=2)

    def mean_std(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.2f} +- {100 * sd:.2f}"

    rows = [
        [
            name,
            mean_std(acc[name]),
            f"{1000 * times[name]:.1f}",
            f"{times['none'] / times[name]:.2f}x",
            f"{100 * computed_share(nets[name]):.0f}%",
        ]
        for name in VARIANTS
    ]
    print(
        f"\nFashion-MNIST rows as tokens, {len(data.y_train)} train / {len(data.y_test)} "
        f"test, {epochs} epochs, batch {args.batch}, {args.layers} layers, "
        f"{len(seeds)} seed(s), threads={torch.get_num_threads()}\n"
    )
    print(
        markdown_table(
            ["variant", "test accuracy %", "step ms", "speed-up", "layers computed"], rows
        )
    )


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
