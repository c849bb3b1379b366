"""Analyses beyond accuracy: subnetwork diversity (Figure 5) and timing (Figure 7,
Table 7)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

import gyrodrop
from gyrodrop.experiments.data import Dataset
from gyrodrop.experiments.train import RunConfig, make_model

__all__ = [
    "subnetwork_features",
    "subnetwork_steps",
    "diversity",
    "time_train_steps",
    "time_block_layer",
    "time_interleaved",
]


def _inner_dropouts(model: nn.Module) -> list[nn.Module]:
    """Dropout-like modules inside ``model.features`` (the last hidden layer's inputs)."""
    feats = model.features
    if not isinstance(feats, nn.Module):  # ResNet18: features is a method
        feats = model
    out: list[nn.Module] = []
    for m in feats.modules():
        if m is getattr(model, "dropout", None):
            continue
        if isinstance(m, (nn.Dropout, gyrodrop.GyroDropout)) and m.p > 0:
            out.append(m)
    return out


def _total_steps(layer: gyrodrop.GyroDropout) -> int:
    return max(int(layer.total_steps or layer.steps_per_set * layer.num_subnets), 1)


def subnetwork_steps(model: nn.Module, count: int) -> list[tuple[int, int]]:
    """``count`` distinct trained subnetworks of ``model``'s gyro layers, spread over
    training, as ``(step, k)``: the subnetwork row group ``k`` trained at ``step``
    (``j * total_steps // count`` with ``k = 0``; where that one was already chosen,
    the other row groups of that step, then the next steps); ``[]`` when ``model`` has
    no gyro layer.

    Raises:
        ValueError: training visited fewer than ``count`` distinct subnetworks (too few
            steps, or ``count`` > sigma): no subnetwork is compared with itself.
    """
    layers = [m for m in _inner_dropouts(model) if isinstance(m, gyrodrop.GyroDropout)]
    if not layers:
        return []
    total = _total_steps(layers[0])
    seen: set[tuple[int, ...]] = set()

    def unseen(step: int) -> tuple[int, tuple[int, ...]] | None:
        active = [[int(s) for s in m.active_subnets(step)] for m in layers]
        for k in range(min(len(a) for a in active)):
            ident = tuple(a[k] for a in active)
            if ident not in seen:
                return k, ident
        return None

    out: list[tuple[int, int]] = []
    for j in range(count):
        start = (j * total) // count
        for step in [*range(start, total), *range(start)]:
            found = unseen(step)
            if found is not None:
                seen.add(found[1])
                out.append((step, found[0]))
                break
        else:
            raise ValueError(
                f"diversity: training visited only {len(seen)} distinct subnetworks "
                f"({total} steps, sigma {layers[0].num_subnets}); count must be <= "
                f"{len(seen)}, got {count}"
            )
    return out


def _mask_fn(
    layer: nn.Module,
    j: int,
    count: int,
    seed: int,
    index: int,
    slot: tuple[int, int] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Scaled mask of network-subnetwork ``j`` for ``layer`` (the ``index``-th one);
    gyro layers use row group ``k``'s subnetwork at ``step`` for ``slot = (step, k)``
    (default ``(j * total // count, 0)``)."""
    if isinstance(layer, gyrodrop.GyroDropout):
        step, k = slot if slot is not None else ((j * _total_steps(layer)) // count, 0)
        sub = int(layer.active_subnets(step)[k])
        return lambda out: layer.subnet_mask(sub, out)
    p = float(getattr(layer, "p", 0.0))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + j) & 0x7FFF_FFFF_FFFF)

    def dropout_mask(out: Tensor) -> Tensor:
        keep = torch.rand(out.shape[1:], generator=gen) >= p
        return keep.to(device=out.device, dtype=out.dtype) / (1.0 - p)

    return dropout_mask


@torch.no_grad()
def subnetwork_features(
    model: nn.Module,
    x: Tensor,
    j: int,
    count: int,
    seed: int = 0,
    slot: tuple[int, int] | None = None,
) -> Tensor:
    """Last hidden features ``(N, F)`` of subnetwork ``j`` of ``count``: every dropout
    layer before the last hidden layer applies one fixed mask in eval mode.

    For gyro dropout, subnetwork ``j`` is the combination of masks that row group 0 used
    at step ``j * total_steps // count`` (masks trained together); for dropout, one
    seeded random mask per layer (a subnetwork is a fixed mask, as at test time).
    ``slot = (step, k)`` picks the gyro subnetwork (see :func:`subnetwork_steps`).
    """
    model.eval()
    handles = []
    for index, layer in enumerate(_inner_dropouts(model)):
        fn = _mask_fn(layer, j, count, seed, index, slot)
        cache: dict[tuple[int, ...], Tensor] = {}

        def hook(
            _m: nn.Module,
            _inp: Any,
            out: Tensor,
            fn: Callable[[Tensor], Tensor] = fn,
            cache: dict[tuple[int, ...], Tensor] = cache,
        ) -> Tensor:
            shape = tuple(out.shape[1:])
            if shape not in cache:
                cache[shape] = fn(out)
            return out * cache[shape]

        handles.append(layer.register_forward_hook(hook))
    try:
        features = cast(Callable[[Tensor], Tensor], model.features)  # module or method
        feats = features(x)
    finally:
        for h in handles:
            h.remove()
    return feats.flatten(1).float()


def diversity(
    model: nn.Module, data: Dataset, *, count: int = 10, eval_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Pairwise normalized L1 distance of the last hidden features among ``count``
    subnetworks on (up to ``eval_size``) test examples.

    ``d(i, j) = mean_x |f_i(x) - f_j(x)|_1 / mean_x (|f_i(x)|_1 + |f_j(x)|_1) / 2``, so it
    does not depend on the features' scale. Returns ``diversity_matrix`` (count x count),
    ``diversity_mean`` (mean over i != j) and ``diversity_layers`` (masked layers).
    """
    if count < 2:
        raise ValueError(f"diversity: count must be >= 2, got {count}")
    if eval_size < 1:
        raise ValueError(f"diversity: eval_size must be >= 1, got {eval_size}")
    slots: list[tuple[int, int] | None] = [*subnetwork_steps(model, count)] or [None] * count
    device = next(model.parameters()).device
    x = data.x_test[:eval_size].to(device)
    feats = [subnetwork_features(model, x, j, count, seed, slots[j]) for j in range(count)]
    norms = [f.abs().sum(1).mean().item() for f in feats]
    matrix = [[0.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            scale = (norms[i] + norms[j]) / 2
            d = (feats[i] - feats[j]).abs().sum(1).mean().item() / scale if scale > 0 else 0.0
            matrix[i][j] = matrix[j][i] = d
    off = [matrix[i][j] for i in range(count) for j in range(count) if i != j]
    return {
        "diversity_matrix": matrix,
        "diversity_mean": statistics.fmean(off),
        "diversity_layers": len(_inner_dropouts(model)),
        "diversity_eval_size": len(x),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_steps(
    configs: Sequence[RunConfig],
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    steps: int = 30,
    warmup: int = 5,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Median milliseconds per training step (forward, backward, RMSprop) of each
    config's model and method on random data of ``in_shape``.

    The configs' steps are interleaved (one step of each in turn), so a machine that
    gets busier or quieter during the measurement affects every method alike.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    batch = max(c.batch_size for c in configs)
    x = torch.randn(batch, *in_shape, generator=gen).to(dev)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    fake = Dataset("bench", x[:2].cpu(), y[:2].cpu(), x[:2].cpu(), y[:2].cpu(), num_classes, ())
    loss_fn = nn.CrossEntropyLoss()
    steppers = []
    for cfg in configs:
        cfg = cfg.normalized()
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            model = make_model(cfg, fake, steps_per_epoch=max(1, steps + warmup)).to(dev).train()
        opt = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
        xb, yb = x[: cfg.batch_size], y[: cfg.batch_size]

        def step(
            model: nn.Module = model,
            opt: torch.optim.Optimizer = opt,
            xb: Tensor = xb,
            yb: Tensor = yb,
        ) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()

        steppers.append(step)
    times = time_interleaved(steppers, steps, warmup, dev)
    return [
        {"ms_per_step": ms, "samples_per_s": c.batch_size / (ms / 1000)}
        for c, ms in zip(configs, times, strict=False)
    ]


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    steps: int,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Median milliseconds of each function, calls interleaved so drift hits all alike
    (``warmup`` untimed rounds first; the device is synchronized around each call)."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times, strict=False):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def time_block_layer(
    drop: float,
    *,
    features: int = 1024,
    batch_size: int = 256,
    block_size: int = 32,
    steps: int = 30,
    warmup: int = 5,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Forward and forward+backward milliseconds of a ``features x features``
    :class:`gyrodrop.BlockGyroLinear` at drop ratio ``drop`` against a dense
    ``nn.Linear`` (Table 7)."""
    block_cls = getattr(gyrodrop, "BlockGyroLinear", None)
    if block_cls is None:
        raise RuntimeError("time_block_layer: needs gyrodrop.BlockGyroLinear, not in this version")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, features, generator=gen).to(dev).requires_grad_(True)
    dense = nn.Linear(features, features).to(dev)
    block = (
        block_cls(
            features,
            features,
            p=drop,
            num_subnets=16,
            subnets_per_step=2,
            block_size=block_size,
            steps_per_set=1_000_000,
        )
        .to(dev)
        .train()
    )
    block.load_state_dict(dense.state_dict(), strict=False)

    def fwd(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                layer(x)

        return run

    def fwd_bwd(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        return run

    blocks = features // block_size
    kept = (blocks - round(drop * blocks)) / blocks if blocks else 1.0
    dense_ms, block_ms = time_interleaved([fwd(dense), fwd(block)], steps, warmup, dev)
    dense_train_ms, block_train_ms = time_interleaved(
        [fwd_bwd(dense), fwd_bwd(block)], steps, warmup, dev
    )
    return {
        "dense_ms": dense_ms,
        "block_ms": block_ms,
        "dense_train_ms": dense_train_ms,
        "block_train_ms": block_train_ms,
        "kept_flops": kept if math.isfinite(kept) else 1.0,
    }
