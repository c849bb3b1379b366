"""Accuracy of a small transformer pruned to fewer layers after training, trained with
and without stochastic depth (why one trains with it: the network survives pruning).

    nice -n 10 python benchmarks/bench_prune_layers.py --threads 1   # the README table
    python benchmarks/bench_prune_layers.py --quick                  # a seconds-long smoke run

The model is ``bench_sd_transformer.py``'s: a Fashion-MNIST image read as a sequence of
its 28 rows, an ``nn.TransformerEncoder`` of 8 pre-norm layers (``d = 32``, 4 heads,
feed-forward 64, dropout 0), mean pooling, a linear head. Each variant trains from the
same weights and batch order per seed (AdamW, cross-entropy), then
:func:`gyrodrop.prune_layers` keeps ``k`` of the 8 layers, spread evenly ("every other
layer" for ``k = 4``: layers 0, 2, 4, 6; Fan et al.'s recommendation), and the pruned
plain model is evaluated on the test set. No fine-tuning after pruning.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from bench_sd_transformer import RowTransformer  # noqa: E402
from gyrodrop.experiments.data import load_dataset  # noqa: E402
from timing import markdown_table  # noqa: E402
from training import accuracy, train_step  # noqa: E402

#: name -> (drop_distribution, drop_rate) of apply_stochastic_depth, or None.
VARIANTS = {
    "none": None,
    "SD 0.5 linear": ("linear", 0.5),
    "SD 0.2 uniform": ("uniform", 0.2),
    "SD 0.5 uniform": ("uniform", 0.5),
}


def kept_layers(depth: int, k: int) -> list[int]:
    """``k`` of ``depth`` layers spread evenly, starting at layer 0."""
    return [i * depth // k for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subset, one epoch, one seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=6000, help="train and test examples")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", default="8,6,4,2", help="layer counts to evaluate")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limit, epochs = (512, 1) if args.quick else (args.limit, args.epochs)
    seeds = [0] if args.quick else list(range(args.seeds))
    counts = [int(k) for k in args.keep.split(",")]
    data = load_dataset("fashion-mnist", args.data_dir, limit=limit)
    print(data.describe(), flush=True)
    steps_per_epoch = len(data.y_train) // args.batch

    acc: dict[tuple[str, int], list[float]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        base = RowTransformer(args.layers)
        g = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(len(data.y_train), generator=g) for _ in range(epochs)]
        for name, spec in VARIANTS.items():
            net: nn.Module = copy.deepcopy(base)
            if spec is not None:
                gyrodrop.apply_stochastic_depth(
                    net, drop_rate=spec[1], drop_distribution=spec[0], seed=seed
                )
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            for order in orders:
                for s in range(steps_per_epoch):
                    idx = order[s * args.batch : (s + 1) * args.batch]
                    train_step(net, opt, data.x_train[idx], data.y_train[idx])
            for k in counts:
                small = gyrodrop.prune_layers(net, {"encoder.layers": kept_layers(args.layers, k)})
                a = accuracy(small, data.x_test, data.y_test, chunk=500)
                acc.setdefault((name, k), []).append(a)
                print(f"seed {seed} {name:15s} {k} layers: test accuracy {a:.4f}", flush=True)

    def mean_std(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.1f} +- {100 * sd:.1f}"

    print(
        f"\nFashion-MNIST rows as tokens, {len(data.y_train)} train / {len(data.y_test)} "
        f"test, {epochs} epochs, batch {args.batch}, {args.layers} layers, "
        f"{len(seeds)} seed(s), threads={torch.get_num_threads()}\n"
    )
    headers = ["trained with"] + [
        f"{k} kept ({','.join(map(str, kept_layers(args.layers, k)))})" for k in counts
    ]
    rows = [[name] + [mean_std(acc[(name, k)]) for k in counts] for name in VARIANTS]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
