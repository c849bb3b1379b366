"""GyroDropout vs nn.Dropout vs a materialized-masks gyro dropout, fwd+bwd, side by side.

    python benchmarks/bench_gyro.py            # 256 x 1024, p=0.5, 2 threads
    python benchmarks/bench_gyro.py --quick    # a seconds-long smoke run

The materialized version is the straightforward implementation of the same algorithm:
all sigma masks drawn up front and stored (sigma x F), and each step gathers one mask
per row. gyrodrop regenerates only the tau active masks when the set changes and
applies them with one broadcast multiply.

"mask memory" is measured on one fwd+bwd: the distinct tensor storages a layer holds
for its masks, i.e. its buffers, the tensors autograd saves for backward (other than the
input) and, for ``GyroDropout``, its cached active masks (``active_masks``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gyrodrop  # noqa: E402
from timing import interleaved_medians, markdown_table  # noqa: E402


class MaterializedGyroDropout(nn.Module):
    """Reference: the same algorithm written the straightforward way.

    All sigma Bernoulli masks are drawn up front and stored (sigma x F bools); each step
    gathers one mask per row and applies ``x * mask / (1 - p)`` as nn.Dropout does.
    """

    def __init__(self, features: int, p: float, sigma: int, tau: int, steps_per_set: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("masks", torch.rand(sigma, features, generator=gen) >= p)
        self.p, self.sigma, self.tau, self.steps_per_set = p, sigma, tau, steps_per_set
        self.gen = gen
        self.step = 0
        self.active = torch.randperm(sigma, generator=gen)[:tau]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step % self.steps_per_set == 0:
            self.active = torch.randperm(self.sigma, generator=self.gen)[: self.tau]
        self.step += 1
        rows = torch.arange(x.shape[0]) * self.tau // x.shape[0]  # row -> group
        return x * self.masks[self.active[rows]] / (1 - self.p)  # (B, F) gathered mask


def measured_mask_bytes(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Bytes of the distinct storages ``layer`` holds for its masks during one fwd+bwd
    (see the module docstring), each storage counted once."""
    storages: dict[int, int] = {}
    skip = {x.untyped_storage().data_ptr()}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.backward(grad)
    x.grad = None
    for buffer in layer.buffers():
        note(buffer)
    if isinstance(layer, gyrodrop.GyroDropout):
        note(layer.active_masks(x))
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny repetition counts")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--sigma", type=int, default=4096)
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    b, f = args.batch, args.features
    steps_per_set = 50
    x = torch.randn(b, f, requires_grad=True)
    grad = torch.randn(b, f)
    layers = {
        "nn.Dropout": nn.Dropout(args.p),
        "materialized gyro": MaterializedGyroDropout(
            f, args.p, args.sigma, args.tau, steps_per_set
        ),
        "gyrodrop.GyroDropout": gyrodrop.GyroDropout(
            args.p, args.sigma, args.tau, steps_per_set=steps_per_set
        ),
    }

    def fwd_bwd(layer: nn.Module):
        def run() -> None:
            x.grad = None
            layer(x).backward(grad)

        return run

    repeats, inner = (3, 5) if args.quick else (21, 50)
    times = interleaved_medians({k: fwd_bwd(v) for k, v in layers.items()}, repeats, inner)
    gyro = times["gyrodrop.GyroDropout"]
    mask_bytes = {name: measured_mask_bytes(layer, x, grad) for name, layer in layers.items()}
    rows = [
        [name, f"{t * 1e6:.0f}", f"{t / gyro:.2f}x", f"{mask_bytes[name] / 2**20:.2f}"]
        for name, t in times.items()
    ]
    print(
        f"fwd+bwd, input {b} x {f}, p={args.p}, sigma={args.sigma}, tau={args.tau}, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    header = ["layer", "median us", "gyrodrop speed-up", "mask memory MiB (measured)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
