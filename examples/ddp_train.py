"""Data-parallel training with gyro dropout: many processes train like one.

Usage (two CPU processes with gloo; on GPUs the same command uses nccl, one GPU each)::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --quick      # a few seconds
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 examples/ddp_train.py

Each rank holds ``--batch-size`` rows of every global batch (DistributedSampler); gyro
dropout assigns its row groups over the global batch, so rank ``r`` applies the masks of
global rows ``[r * B, (r + 1) * B)`` and the run equals one process training on the
concatenated batch. Nothing extra is communicated: masks derive from (seed, step).
Data: scikit-learn's bundled 8x8 digits (no download); synthetic data without sklearn.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import gyrodrop


@dataclass
class Config:
    # data
    batch_size: int = 32  # rows per rank; the global batch is world * batch_size
    # model
    hidden: int = 256
    dropout: float = 0.5
    # gyro dropout
    num_subnets: int = 64
    subnets_per_step: int = 8
    seed: int = 0
    # optimisation
    epochs: int = 30
    lr: float = 0.05


def load_data() -> tuple[TensorDataset, TensorDataset, int, int]:
    """Train and test sets of flattened 8x8 digits in [0, 1], or synthetic blobs."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
        y = torch.tensor(digits.target, dtype=torch.int64)
    except ImportError:  # a linearly separable synthetic stand-in
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(10, 64, generator=g) * 2
        y = torch.randint(0, 10, (1800,), generator=g)
        x = centers[y] + torch.randn(1800, 64, generator=g)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), x.shape[1], 10


def build_model(features: int, classes: int, cfg: Config) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    model.eval()
    x, y = data.tensors
    pred = model(x.to(device)).argmax(dim=1)
    model.train()
    return float((pred == y.to(device)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per rank")
    args = parser.parse_args()
    cfg = Config()
    if args.quick:
        cfg.epochs = 2
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    train_set, test_set, features, classes = load_data()
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed)  # equal rows per rank
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler)
    total_steps = cfg.epochs * len(loader)  # optimizer steps; the same on every rank

    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = build_model(features, classes, cfg)
    replaced = gyrodrop.apply_gyro_dropout(
        model,
        num_subnets=cfg.num_subnets,
        subnets_per_step=cfg.subnets_per_step,
        total_steps=total_steps,
        seed=cfg.seed,
    )
    model = DDP(model.to(device), device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)

    start, global_batch = gyrodrop.distributed.row_window(cfg.batch_size)
    print(
        f"rank {rank}/{world} on {device}: {len(sampler)} of {len(train_set)} training rows, "
        f"global rows [{start}, {start + cfg.batch_size}) of each {global_batch}-row batch, "
        f"{replaced} dropout layers -> GyroDropout, {total_steps} steps",
        flush=True,
    )

    began = time.perf_counter()
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # DDP averages the gradients over ranks
            optimizer.step()
        if rank == 0 and (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: last loss {loss.item():.4f}", flush=True)

    gyrodrop.distributed.check_lockstep(model)  # every rank ended at the same step
    if rank == 0:
        acc = accuracy(model.module, test_set, device)
        print(
            f"test accuracy {acc:.4f} after {total_steps} steps "
            f"({time.perf_counter() - began:.1f} s, {world} ranks)",
            flush=True,
        )
    # Free DDP (its reducer holds the process group) before destroying the group: a gloo
    # group whose last reference goes with the reducer can deadlock at exit (torch 2.x).
    del model, optimizer
    gc.collect()
    dist.barrier()  # let rank 0 finish evaluating before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
