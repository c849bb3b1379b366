"""Model surgery: swap gyrodrop regularizers into an existing model, in place.

Surgery is a policy: a mapping from module type to a function that receives the
module and its index among the matches (so settings can depend on depth) and returns
the replacement. Wrappers (DistributedDataParallel, DataParallel, ``torch.compile``)
are unwrapped first; the replacement goes on the replaced module's device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from gyrodrop.blockwise import (
    SURGERY_PRUNE,
    BlockGyroLinear,
    find_block_sites,
    n_dropped_blocks,
)
from gyrodrop.gyro import GyroDropout
from gyrodrop.masks import mix_keys
from gyrodrop.schedule import check_p, check_seed

__all__ = [
    "apply_gyro_dropout",
    "apply_stochastic_depth",
    "apply_block_gyro",
    "unwrap_model",
    "replace_modules",
    "layer_seed",
]

Policy = Mapping[type, Callable[[nn.Module, int], nn.Module | None]]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def layer_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th replaced layer: distinct per layer, fixed by ``seed``."""
    return (mix_keys(seed, 0xD5, index) << 31) | (index & 0x7FFFFFFF)


def _device_of(module: nn.Module, fallback: torch.device | None) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return fallback


def _model_device(model: nn.Module) -> torch.device | None:
    return _device_of(model, None)


def replace_modules(model: nn.Module, policy: Policy) -> int:
    """Replace every module whose exact type is in ``policy``; returns the count.

    Matches are visited in ``named_modules`` order; the policy function gets the module
    and its match index and may return ``None`` to leave the module alone.
    """
    model = unwrap_model(model)
    device = _model_device(model)
    matches = [(name, module) for name, module in model.named_modules() if type(module) in policy]
    replaced = 0
    for index, (name, module) in enumerate(matches):
        new = policy[type(module)](module, index)
        if new is None:
            continue
        if not name:
            raise ValueError("replace_modules: cannot replace the root module itself")
        target = _device_of(module, device)
        if target is not None:
            new = new.to(target)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced += 1
    return replaced


_CHANNELWISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

#: ``pairing`` values of :func:`apply_gyro_dropout`.
PAIRINGS = ("shared", "independent")


def apply_gyro_dropout(
    model: nn.Module,
    *,
    p: float | None = None,
    num_subnets: int = 256,
    subnets_per_step: int = 16,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    pairing: str = "shared",
    **kw: Any,
) -> int:
    """Replace ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` in ``model`` with
    :class:`~gyrodrop.GyroDropout`, in place.

    ``Dropout1d/2d/3d`` become channel-wise masks (``dims=(1,)``). ``p=None`` keeps each
    layer's own ``p``. Every layer gets its own mask seed derived from ``seed`` and its
    position, and all share the schedule seed ``seed``, so subnetwork ``k`` of the
    model (mask ``k`` in every layer) is trained as one network, as in the paper.
    Layers already replaced are left alone. Other keyword arguments (``schedule``,
    ``scale``, ``dims``, ``auto_step``) go to every ``GyroDropout``.

    ``pairing`` says how the layers' masks form subnetworks:

    - ``"shared"`` (default): one schedule for the whole network (schedule seed
      ``seed`` in every layer), so the active ids are the same in every layer;
    - ``"independent"``: every layer gets its own schedule seed, so each layer picks its
      active masks independently of the others; the schedule defaults to
      ``"replacement"`` (ids drawn with replacement, as the authors' TensorFlow code
      does) unless ``schedule`` is given. The model then trains no fixed set of
      network-level subnetworks.

    Returns the number of layers replaced, and warns when it is zero.

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        >>> gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=16, subnets_per_step=4)
        1
        >>> model[1].p
        0.3
    """
    if p is not None:
        p = check_p("apply_gyro_dropout", p)
    check_seed("apply_gyro_dropout", seed)
    if pairing not in PAIRINGS:
        raise ValueError(f"apply_gyro_dropout: pairing must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "independent":
        kw.setdefault("schedule", "replacement")
    allowed = {"dims", "schedule", "scale", "auto_step"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"apply_gyro_dropout: unexpected keyword arguments {sorted(unknown)}; "
            f"allowed: {sorted(allowed)} besides the named ones"
        )

    def make(module: nn.Module, index: int) -> nn.Module:
        options = dict(kw)
        if isinstance(module, _CHANNELWISE):
            options.setdefault("dims", (1,))
        return GyroDropout(
            p=cast(float, module.p) if p is None else p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,
            seed=layer_seed(seed, index),
            schedule_seed=seed if pairing == "shared" else layer_seed(seed, index),
            **options,
        )

    with warnings.catch_warnings():
        # One warning for the whole model instead of one per layer.
        if total_steps is None and steps_per_set is None:
            warnings.warn(
                "apply_gyro_dropout: neither total_steps nor steps_per_set given; "
                "using steps_per_set=1",
                UserWarning,
                stacklevel=3,
            )
            warnings.simplefilter("ignore", UserWarning)
        policy: Policy = dict.fromkeys((nn.Dropout, *_CHANNELWISE), make)
        count = replace_modules(model, policy)
    if count == 0:
        warnings.warn(
            "apply_gyro_dropout: no nn.Dropout / Dropout1d/2d/3d layer found; "
            "the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
    return count


DROP_DISTRIBUTIONS = ("uniform", "linear")


def apply_stochastic_depth(
    model: nn.Module,
    drop_rate: float = 0.2,
    drop_distribution: str = "linear",
    mode: str = "block",
    drop_warmup: float = 0.0,
    *,
    total_steps: int | None = None,
    target: type | tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
    seed: int = 0,
    auto_step: bool = True,
) -> int:
    """Wrap the residual blocks of ``model`` in
    :class:`~gyrodrop.stochastic_depth.StochasticDepthBlock`, in place.

    Found without ``target``: torchvision-shaped ``BasicBlock``/``Bottleneck`` blocks
    (children ``conv1, bn1, conv2, bn2[, conv3, bn3]``, optional ``downsample`` (or
    ``shortcut``) and ``relu``; each checked once against its own forward on a probe
    input), gyrodrop's ResNet blocks, and blocks whose class defines ``branch(x)`` and
    ``shortcut(x)`` (:class:`~gyrodrop.stochastic_depth.ResidualBlock`). ``target`` (a
    type, tuple of types or predicate) selects blocks instead.

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are looked through).
        drop_rate: drop probability of the last block, in ``[0, 1)``.
        drop_distribution: ``"linear"``: block ``i`` of ``L`` (in ``named_modules``
            order) gets ``drop_rate * (i + 1) / L``; ``"uniform"``: every block
            ``drop_rate``.
        mode: ``"block"`` (the whole batch skips a dropped branch; it is not computed)
            or ``"sample"`` (per example).
        drop_warmup: fraction of ``total_steps`` over which every rate ramps linearly
            from 0; the full rate is reached at step ``round(drop_warmup * total_steps)``.
        total_steps: optimizer steps of the run; required when ``drop_warmup > 0``.
        target: which modules are residual blocks (see above).
        seed: every block gets its own seed derived from this and its index.
        auto_step: see :class:`~gyrodrop.StochasticDepth`.

    Returns the number of blocks wrapped, and warns when it is zero. Blocks already
    wrapped are left alone. ``eval()`` outputs are unchanged by the surgery.

    Example:
        >>> import torch, gyrodrop
        >>> from gyrodrop.experiments.models import ResNet18
        >>> net = ResNet18((3, 32, 32), (32,), 10, 0.0, base=8).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> before = net(x)
        >>> gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        8
        >>> bool(torch.equal(net(x), before))
        True
    """
    from gyrodrop.stochastic_depth import (
        StochasticDepthBlock,
        _check_mode,
        find_residual_blocks,
        linear_rates,
        warmup_steps_for,
    )

    owner = "apply_stochastic_depth"
    drop_rate = check_p(owner, drop_rate)
    if drop_distribution not in DROP_DISTRIBUTIONS:
        raise ValueError(
            f"{owner}: drop_distribution must be one of {DROP_DISTRIBUTIONS}, "
            f"got {drop_distribution!r}"
        )
    _check_mode(owner, mode)
    warmup = warmup_steps_for(owner, drop_warmup, total_steps)
    check_seed(owner, seed)
    if not isinstance(auto_step, bool):
        raise ValueError(f"{owner}: auto_step must be a bool, got {auto_step!r}")

    root = unwrap_model(model)
    blocks = find_residual_blocks(root, target)
    if drop_distribution == "linear":
        rates = linear_rates(drop_rate, len(blocks))
    else:
        rates = [drop_rate] * len(blocks)
    chosen = {id(block): (i, split) for i, (_, block, split) in enumerate(blocks)}

    def make(module: nn.Module, _: int) -> nn.Module | None:
        if id(module) not in chosen:
            return None
        i, split = chosen[id(module)]
        return StochasticDepthBlock(
            module,
            rates[i],
            mode,
            seed=layer_seed(seed, i),
            auto_step=auto_step,
            warmup_steps=warmup,
            split=split,
        )

    policy: Policy = dict.fromkeys({type(block) for _, block, _ in blocks}, make)
    count = replace_modules(root, policy) if blocks else 0
    if count == 0:
        warnings.warn(
            f"{owner}: no residual block found (torchvision-shaped BasicBlock/Bottleneck "
            "or a class with branch/shortcut methods, not already wrapped); the model is "
            "unchanged. Hint: pass target= (a block type or predicate) for other blocks",
            UserWarning,
            stacklevel=2,
        )
    return count


def apply_block_gyro(
    model: nn.Module,
    *,
    p: float | None = None,
    num_subnets: int = 256,
    subnets_per_step: int = 2,
    block_size: int = 32,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    prune: str = "input",
    **kw: Any,
) -> int:
    """Fuse ``nn.Dropout`` into the adjacent ``nn.Linear`` as block-wise gyro dropout
    (:class:`~gyrodrop.BlockGyroLinear`), in place; returns the number of fused pairs.

    ``prune="input"`` (default) fuses ``Dropout -> Linear``: the Linear becomes an
    input-pruned ``BlockGyroLinear`` and the Dropout an ``nn.Identity``.
    ``prune="output"`` fuses ``Linear [-> ReLU/LeakyReLU/PReLU] -> Dropout`` (dropout
    after the Linear, the activation kept in place: it commutes with the mask).
    ``prune="auto"`` fuses every dropout it can, on the side that prunes the most GEMM
    work (see :func:`gyrodrop.blockwise.find_block_sites`). The pairs are found in
    ``nn.Sequential`` containers and, through ``torch.fx`` symbolic tracing, anywhere
    in a traceable model; the model itself is changed in place (its own ``forward``
    still runs: fx only reads the dataflow), and its Linear parameters are kept (an
    optimizer built before keeps working).

    ``p=None`` keeps each Dropout's own ``p``; every fused layer gets its own mask seed
    derived from ``seed`` and its position, and all share the schedule seed ``seed``
    (network-level subnetworks, as in :func:`apply_gyro_dropout`). ``schedule`` and
    ``auto_step`` may be passed as keywords. Dropouts that cannot be fused (followed by
    something else than a Linear, a module used twice, a functional ``F.dropout``, too
    few blocks for ``p``) are left as they are and listed in one warning.

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> model = nn.Sequential(
        ...     nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10)
        ... )
        >>> gyrodrop.apply_block_gyro(model, total_steps=1000)
        1
        >>> type(model[2]).__name__, type(model[3]).__name__, model[3].p
        ('Identity', 'BlockGyroLinear', 0.5)
    """
    owner = "apply_block_gyro"
    if p is not None:
        p = check_p(owner, p)
    check_seed(owner, seed)
    if prune not in SURGERY_PRUNE:
        raise ValueError(f"{owner}: prune must be one of {SURGERY_PRUNE}, got {prune!r}")
    allowed = {"schedule", "auto_step"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(unknown)}; "
            f"allowed: {sorted(allowed)} besides the named ones"
        )
    root = unwrap_model(model)
    sites, problems = find_block_sites(root, prune)
    count = 0
    with warnings.catch_warnings():
        if total_steps is None and steps_per_set is None:
            warnings.warn(
                f"{owner}: neither total_steps nor steps_per_set given; using steps_per_set=1",
                UserWarning,
                stacklevel=3,
            )
            warnings.filterwarnings("ignore", message=".*neither total_steps nor steps_per_set")
        for index, site in enumerate(sites):
            dropout = root.get_submodule(site.dropout)
            linear = cast(nn.Linear, root.get_submodule(site.linear))
            rate = cast(float, dropout.p) if p is None else p
            features = linear.in_features if site.prune == "input" else linear.out_features
            n_blocks = -(-features // block_size)
            if n_dropped_blocks(rate, n_blocks) >= n_blocks:
                problems.append(
                    f"{site.dropout}: p={rate} would drop all {n_blocks} blocks of "
                    f"{site.linear}'s {features} {site.prune} features; lower block_size"
                )
                continue
            fused = BlockGyroLinear.from_linear(
                linear,
                p=rate,
                num_subnets=num_subnets,
                subnets_per_step=subnets_per_step,
                block_size=block_size,
                total_steps=total_steps,
                steps_per_set=steps_per_set,
                seed=layer_seed(seed, index),
                schedule_seed=seed,
                prune=site.prune,
                **kw,
            )
            for name, new in ((site.linear, fused), (site.dropout, nn.Identity())):
                parent_name, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
            count += 1
    if problems:
        warnings.warn(
            f"{owner}: fused {count} pair(s); left {len(problems)} dropout(s) as they were: "
            + " | ".join(problems),
            UserWarning,
            stacklevel=2,
        )
    elif count == 0:
        warnings.warn(
            f"{owner}: no nn.Dropout found; the model is unchanged", UserWarning, stacklevel=2
        )
    return count
