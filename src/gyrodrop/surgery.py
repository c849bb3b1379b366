"""Model surgery: swap gyrodrop regularizers into an existing model, in place.

Surgery is a policy: a mapping from module type to a function that receives the
module and its index among the matches (so settings can depend on depth) and returns
the replacement. Wrappers (DistributedDataParallel, DataParallel, ``torch.compile``)
are unwrapped first; the replacement goes on the replaced module's device.

Surgery is all-or-nothing: every replacement is built (and validated) before the
first one is swapped in, so a refused model (one layer with ``p=1.0``, say) is left
exactly as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, cast

from torch import nn

from gyrodrop._modules import Policy, check_model, replace_modules, swap_all, unwrap_model
from gyrodrop._validation import check_bool, check_choice, check_int, check_p, check_seed
from gyrodrop.blockwise import (
    SURGERY_PRUNE,
    BlockGyroLinear,
    SurgeryPrune,
    find_block_sites,
    n_dropped_blocks,
)
from gyrodrop.gyro import GyroDropout
from gyrodrop.masks import layer_seed
from gyrodrop.schedule import attach_stepper
from gyrodrop.stochastic_depth import (
    MODES,
    LayerSplit,
    Mode,
    StochasticDepthBlock,
    StochasticDepthLayer,
    find_residual_blocks,
    linear_rates,
    warmup_steps_for,
)

__all__ = [
    "apply_gyro_dropout",
    "apply_stochastic_depth",
    "apply_block_gyro",
    "unwrap_model",
    "replace_modules",
    "layer_seed",
    "builtin_dropouts",
    "Policy",
]

_CHANNELWISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Input dims of an unbatched input to each channel-wise dropout, as torch reads them:
# Dropout1d (C, L), Dropout3d (C, D, H, W). Dropout2d reads a 3-D input as (N, C, L)
# (batched, torch's behavior with its deprecation warning), so it has none.
_UNBATCHED_NDIM: dict[type, int | None] = {
    nn.Dropout1d: 2,
    nn.Dropout2d: None,
    nn.Dropout3d: 4,
}
_DROPOUT_FAMILY = (nn.Dropout, *_CHANNELWISE, nn.AlphaDropout, nn.FeatureAlphaDropout)


def apply_gyro_dropout(
    model: nn.Module,
    *,
    p: float | None = None,
    num_subnets: int = 256,
    subnets_per_step: int = 16,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> int:
    """Replace ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` in ``model`` with
    :class:`~gyrodrop.GyroDropout`, in place.

    ``Dropout1d/2d/3d`` become channel-wise masks (``dims=(1,)``); unbatched inputs keep
    torch's meaning (``Dropout1d``: ``(C, L)``, ``Dropout3d``: ``(C, D, H, W)``, whole
    channels; ``Dropout2d`` reads a 3-D input as ``(N, C, L)``, as torch does).
    ``p=None`` keeps each
    layer's own ``p``. Every layer gets its own mask seed derived from ``seed`` and its
    position, and all share the schedule seed ``seed``, so subnetwork ``k`` of the
    model (mask ``k`` in every layer) is trained as one network, as in the paper.
    Layers already replaced are left alone. Other keyword arguments (``schedule``,
    ``scale``, ``dims``, ``auto_step``) go to every ``GyroDropout``.

    Stepping: with ``auto_step=True`` (default) ``model`` gets one model-level stepper
    (:func:`gyrodrop.schedule.attach_stepper`, shared by every ``apply_*``): after each
    training-mode forward of ``model`` every gyrodrop layer in it advances exactly one
    step, whether it was called 0, 1 or many times, and a recompute by activation
    checkpointing replays the same masks. Call the model you passed here (not a
    sub-module) to train; for gradient accumulation use
    :func:`gyrodrop.bind_to_optimizer`. ``auto_step=False``: call
    :func:`gyrodrop.step` yourself.

    Returns the number of layers replaced, and warns when it is zero. All-or-nothing:
    when any layer is refused (``p=1.0``, say) the model is left unchanged. Dropout built
    into other modules (``nn.LSTM(dropout=p)``, ``nn.MultiheadAttention(dropout=p)``,
    e.g. inside ``nn.TransformerEncoderLayer``) cannot be swapped: it is left alone and
    named in a warning (see :func:`builtin_dropouts`).

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        >>> gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=16, subnets_per_step=4)
        1
        >>> model[1].p
        0.3
    """
    check_model("apply_gyro_dropout", model)
    if p is not None:
        p = check_p("apply_gyro_dropout", p)
    check_seed("apply_gyro_dropout", seed)
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
            if options["dims"] == (1,) or options["dims"] == 1:
                options.setdefault("unbatched_ndim", _UNBATCHED_NDIM[type(module)])
        new = GyroDropout(
            p=cast(float, module.p) if p is None else p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,
            seed=layer_seed(seed, index),
            schedule_seed=seed,
            **options,
        )
        object.__setattr__(new, "_gyrodrop_replaced", type(module))  # remove_gyro_dropout
        return new

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
    if count and kw.get("auto_step", True):
        attach_stepper(model)
    if count == 0:
        warnings.warn(
            "apply_gyro_dropout: no nn.Dropout / Dropout1d/2d/3d layer found; "
            "the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
    builtin = builtin_dropouts(model)
    if builtin:
        warnings.warn(
            "apply_gyro_dropout: left alone (their dropout is built into the module, not a "
            "Dropout layer): " + ", ".join(builtin),
            UserWarning,
            stacklevel=2,
        )
    return count


def builtin_dropouts(model: nn.Module) -> list[str]:
    """Modules whose dropout is an argument, not a child ``nn.Dropout``, so surgery
    cannot swap it: ``nn.LSTM``/``GRU``/``RNN(dropout=p)`` (between stacked layers) and
    ``nn.MultiheadAttention(dropout=p)`` (on the attention weights, inside
    ``F.multi_head_attention_forward``), as ``"name (Type, dropout=p)"``."""
    found = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and float(m.dropout) > 0:
            found.append(f"{name or '<root>'} ({type(m).__name__}, dropout={m.dropout})")
    return found


#: How ``drop_rate`` spreads over depth: the same everywhere, or growing linearly.
DropDistribution = Literal["uniform", "linear"]
DROP_DISTRIBUTIONS: tuple[DropDistribution, ...] = ("uniform", "linear")


def apply_stochastic_depth(
    model: nn.Module,
    drop_rate: float = 0.2,
    drop_distribution: DropDistribution = "linear",
    mode: Mode = "block",
    drop_warmup: float = 0.0,
    *,
    total_steps: int | None = None,
    target: type | tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
    seed: int = 0,
    auto_step: bool = True,
    per_rank: bool = False,
    example_inputs: Any = None,
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
        auto_step: ``True`` (default): the model steps every block once per training
            forward of ``model`` (the model-level stepper of
            :func:`apply_gyro_dropout`; :func:`gyrodrop.bind_to_optimizer` for one step
            per optimizer step); ``False``: call :func:`gyrodrop.step` yourself.
        per_rank: block mode under data parallelism: ``True`` lets each rank draw its
            own decisions (default ``False``: identical decisions on every rank).
        example_inputs: inputs of one forward of ``model`` (a tensor, a tuple of
            positional arguments or a dict of keywords), used once to check that the
            layers to wrap keep the shape of their hidden states.

    Transformer layers: the layers of a model's layer stack (Hugging Face
    ``encoder.layer``, ``model.layers``, ``transformer.h``, ``blocks``;
    ``nn.TransformerEncoder/Decoder.layers``) are found too and wrapped whole in
    :class:`~gyrodrop.stochastic_depth.StochasticDepthLayer`:
    ``x + keep * (f(x) - x) / (1 - p)``; a dropped layer is not computed. ``target``
    may select any layer whose forward takes the hidden states first and returns them
    first; one that changes their shape is refused here (see
    :func:`~gyrodrop.stochastic_depth.find_residual_blocks` for how shapes are checked).

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
    owner = "apply_stochastic_depth"
    check_model(owner, model)
    drop_rate = check_p(owner, drop_rate)
    check_choice(owner, "drop_distribution", drop_distribution, DROP_DISTRIBUTIONS)
    check_choice(owner, "mode", mode, MODES)
    warmup = warmup_steps_for(owner, drop_warmup, total_steps)
    check_seed(owner, seed)
    check_bool(owner, "auto_step", auto_step)

    check_bool(owner, "per_rank", per_rank)

    root = unwrap_model(model)
    blocks = find_residual_blocks(root, target, example_inputs)
    if drop_distribution == "linear":
        rates = linear_rates(drop_rate, len(blocks))
    else:
        rates = [drop_rate] * len(blocks)
    chosen = {id(block): (i, split) for i, (_, block, split) in enumerate(blocks)}
    names = [name for name, _, _ in blocks]

    def make(module: nn.Module, _: int) -> nn.Module | None:
        if id(module) not in chosen:
            return None
        i, split = chosen[id(module)]
        if isinstance(split, LayerSplit):
            return StochasticDepthLayer(
                module,
                rates[i],
                mode,
                seed=layer_seed(seed, i),
                auto_step=auto_step,
                warmup_steps=warmup,
                per_rank=per_rank,
                name=names[i],
                split=split,
            )
        return StochasticDepthBlock(
            module,
            rates[i],
            mode,
            seed=layer_seed(seed, i),
            auto_step=auto_step,
            warmup_steps=warmup,
            split=split,
            per_rank=per_rank,
        )

    policy: Policy = dict.fromkeys({type(block) for _, block, _ in blocks}, make)
    count = replace_modules(root, policy) if blocks else 0
    if count and auto_step:
        attach_stepper(root)
    if count == 0:
        warnings.warn(
            f"{owner}: no residual block found (torchvision-shaped BasicBlock/Bottleneck, "
            "a class with branch/shortcut methods or a transformer layer stack, not "
            "already wrapped); the model is "
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
    prune: SurgeryPrune = "input",
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
    (network-level subnetworks, as in :func:`apply_gyro_dropout`). ``schedule``,
    ``auto_step`` and ``backend`` (of :class:`~gyrodrop.BlockGyroLinear`) may be passed
    as keywords; stepping is as in
    :func:`apply_gyro_dropout` (one step per training forward of ``model``). Every
    dropout that is not fused (followed by something else than a Linear, a module used
    twice, a functional ``F.dropout``,
    too few blocks for ``p``, inside a ``torch.nn`` layer such as
    ``nn.TransformerEncoderLayer`` that tracing does not enter, ``Dropout2d`` and the
    like) is left as it is and named, with the reason, in one warning that counts
    the dropouts left alone. All-or-nothing: when building a fused layer fails, the
    model is unchanged.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``; ``block_size`` is not an int
            >= 1 (checked first); ``p``, ``seed``, ``prune`` or the schedule options
            are invalid.

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
    check_model(owner, model)
    check_int(owner, "block_size", block_size, 1)
    if p is not None:
        p = check_p(owner, p)
    check_seed(owner, seed)
    check_choice(owner, "prune", prune, SURGERY_PRUNE)
    allowed = {"schedule", "auto_step", "backend"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(unknown)}; "
            f"allowed: {sorted(allowed)} besides the named ones"
        )
    root = unwrap_model(model)
    sites, problems = find_block_sites(root, prune)
    swaps: list[tuple[str, nn.Module]] = []
    fused_dropouts = set()
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
            swaps += [(site.linear, fused), (site.dropout, nn.Identity())]
            fused_dropouts.add(site.dropout)
    swap_all(root, swaps)  # only once every fused layer was built
    count = len(fused_dropouts)
    if count and kw.get("auto_step", True):
        attach_stepper(root)
    left, notes = _left_alone(root, fused_dropouts, problems)
    if left:
        warnings.warn(
            f"{owner}: fused {count} pair(s); left {len(left)} dropout(s) as they were: "
            + " | ".join(left)
            + "".join(f" ({note})" for note in notes),
            UserWarning,
            stacklevel=2,
        )
    elif notes:  # every dropout module fused, but functional calls may be unseen
        warnings.warn(
            f"{owner}: fused {count} pair(s); " + "; ".join(notes), UserWarning, stacklevel=2
        )
    elif count == 0:
        warnings.warn(
            f"{owner}: no nn.Dropout found; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
    return count


def _left_alone(
    root: nn.Module, fused: set[str], problems: list[str]
) -> tuple[list[str], list[str]]:
    """``"name: reason"`` for every dropout of ``root`` that was not fused (dropout
    modules, each once, and functional dropout calls), and the notes of ``problems``
    that are about no single dropout (a failed trace)."""
    by_name: dict[str, list[str]] = {}
    notes: list[str] = []
    for problem in problems:
        name, sep, _ = problem.partition(": ")
        if sep and " " not in name:
            by_name.setdefault(name, []).append(problem)
        else:
            notes.append(problem)
    traced = not any(note.startswith("torch.fx could not trace") for note in notes)
    left: list[str] = []
    seen: set[str] = set()
    modules = dict(root.named_modules())
    for name, module in root.named_modules():
        if not isinstance(module, _DROPOUT_FAMILY) or name in fused:
            continue
        seen.add(name)
        if name in by_name:
            left.append(by_name[name].pop(0))
        elif type(module) is not nn.Dropout:
            left.append(
                f"{name}: a {type(module).__name__} is not an element-wise nn.Dropout "
                "(only nn.Dropout is fused)"
            )
        elif (owner := _torch_nn_owner(name, modules)) is not None:
            left.append(
                f"{name}: inside {owner}, a torch.nn layer that is not traced into "
                "(its forward calls the dropout itself)"
            )
        elif not traced:
            left.append(f"{name}: not in an nn.Sequential next to an nn.Linear")
        else:
            left.append(f"{name}: not called by the model's traced forward")
    # functional dropout calls and other named problems that are no module
    left += [problem for rest in by_name.values() for problem in rest]
    return left, notes


def _torch_nn_owner(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The outermost ancestor of ``name`` that is a ``torch.nn`` layer other than a
    container (``nn.TransformerEncoderLayer``, ``nn.Transformer``, ...), as
    ``"path (Type)"``, or ``None``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        module = modules.get(path)
        if module is None or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if type(module).__module__.startswith("torch.nn"):
            return f"{path} ({type(module).__name__})"
    return None
