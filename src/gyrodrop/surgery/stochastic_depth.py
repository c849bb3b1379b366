"""Stochastic-depth surgery: wrap a model's residual blocks or transformer layers
(:func:`apply_stochastic_depth`), unwrap them (:func:`remove_stochastic_depth`), and
turn a model's own ``DropPath`` modules into seeded :class:`~gyrodrop.StochasticDepth`
(:func:`replace_drop_paths`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

from gyrodrop._modules import Policy, check_model, replace_modules, unwrap_model
from gyrodrop._validation import check_bool, check_choice, check_int, check_p, check_seed
from gyrodrop.config import DropMode, KeptRows, StochasticDepthConfig
from gyrodrop.masks import layer_seed
from gyrodrop.stepping import detach_stepper
from gyrodrop.stochastic_depth import (
    LayerSplit,
    Mode,
    StochasticDepth,
    StochasticDepthBlock,
    StochasticDepthLayer,
)
from gyrodrop.surgery.common import SurgeryWarning, rewrite
from gyrodrop.surgery.residual import find_residual_blocks

__all__ = [
    "apply_stochastic_depth",
    "remove_stochastic_depth",
    "replace_drop_paths",
    "linear_rates",
    "warmup_steps_for",
    "DropDistribution",
    "DROP_DISTRIBUTIONS",
]

#: How ``drop_rate`` spreads over depth: the same everywhere, or growing linearly.
DropDistribution = Literal["uniform", "linear"]
DROP_DISTRIBUTIONS: tuple[DropDistribution, ...] = ("uniform", "linear")


def apply_stochastic_depth(
    model: nn.Module,
    drop_rate: float | Sequence[float] | Sequence[Sequence[float]] = 0.2,
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
    drop_mode: DropMode = "standard",
    drop_cutoff: float | None = None,
    kept_rows: KeptRows = "random",
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
        drop_rate: drop probability of the last block, in ``[0, 1)``; or the rate of
            every block found, in order (a flat sequence, or per stage as
            :func:`gyrodrop.depth_rates` returns them), used as given
            (``drop_distribution`` does not apply); its length must equal the number
            of blocks found.
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
        drop_mode: ``"standard"`` (drop all run long), ``"early"`` (drop before the
            cutoff only: early dropout, against underfitting) or ``"late"`` (after it
            only); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps``, in ``(0, 1)``: every layer gets
            ``cutoff_step = round(drop_cutoff * total_steps)``.
        per_rank: block mode under data parallelism: ``True`` lets each rank draw its
            own decisions (default ``False``: identical decisions on every rank).
        kept_rows: sample mode: ``"random"`` (default: each example kept alone with
            probability ``1 - p``) or ``"fixed"`` (exactly ``B - round(p * B)`` rows
            kept per step, scaled by ``B / kept``: static shapes, for
            ``torch.compile``). Either way a layer or branch whose rows are independent
            is computed on the kept rows only (see :class:`~gyrodrop.StochasticDepth`).
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
    :func:`~gyrodrop.surgery.find_residual_blocks` for how shapes are checked).

    Returns the number of blocks wrapped, and warns when it is zero. Blocks already
    wrapped are left alone. ``eval()`` outputs are unchanged by the surgery.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> class Block(nn.Module):  # torchvision-shaped: conv1, bn1, conv2, bn2
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        ...         self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        ...         self.relu = nn.ReLU()
        ...
        ...     def forward(self, x):
        ...         y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        ...         return self.relu(x + y)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8)).eval()
        >>> x = torch.randn(2, 3, 16, 16)
        >>> before = net(x)
        >>> gyrodrop.apply_stochastic_depth(net, drop_rate=0.5)
        2
        >>> bool(torch.equal(net(x), before))
        True
    """
    owner = "apply_stochastic_depth"
    check_model(owner, model)
    given = _given_rates(owner, drop_rate)
    check_choice(owner, "drop_distribution", drop_distribution, DROP_DISTRIBUTIONS)
    warmup = warmup_steps_for(owner, drop_warmup, total_steps)
    config = StochasticDepthConfig(  # every setting but the rates, checked once
        p=0.0 if isinstance(given, list) else given,
        mode=mode,
        warmup_steps=warmup,
        per_rank=per_rank,
        drop_mode=drop_mode,
        drop_cutoff=drop_cutoff,
        total_steps=total_steps,
        kept_rows=kept_rows,
        owner=owner,
        names={"p": "drop_rate"},
    )
    check_seed(owner, seed)
    auto_step = check_bool(owner, "auto_step", auto_step)

    root = unwrap_model(model)
    blocks = find_residual_blocks(root, target, example_inputs)
    if isinstance(given, list):
        if len(given) != len(blocks):
            raise ValueError(
                f"{owner}: drop_rate has {len(given)} rates but {len(blocks)} blocks were "
                "found; hint: one rate per block, in named_modules order (see "
                "gyrodrop.surgery.find_residual_blocks)"
            )
        rates = given
    elif drop_distribution == "linear":
        rates = linear_rates(given, len(blocks))
    else:
        rates = [given] * len(blocks)
    chosen = {id(block): (i, split) for i, (_, block, split) in enumerate(blocks)}
    names = [name for name, _, _ in blocks]
    _warn_on_drop_paths_inside(owner, blocks, rates)

    def make(module: nn.Module, _: int) -> nn.Module | None:
        if id(module) not in chosen:
            return None
        i, split = chosen[id(module)]
        layer = config.replace(owner=owner, p=rates[i])
        core: dict[str, Any] = {
            "p": layer.p,
            "mode": layer.mode,
            "warmup_steps": warmup,
            "per_rank": per_rank,
        }
        wrapper: StochasticDepthBlock | StochasticDepthLayer
        if isinstance(split, LayerSplit):
            wrapper = StochasticDepthLayer(
                module,
                **core,
                seed=layer_seed(seed, i),
                auto_step=auto_step,
                name=names[i],
                split=split,
            )
        else:
            wrapper = StochasticDepthBlock(
                module, **core, seed=layer_seed(seed, i), auto_step=auto_step, split=split
            )
        wrapper.stochastic_depth.config = layer  # with the timing fields
        return wrapper

    policy: Policy = dict.fromkeys({type(block) for _, block, _ in blocks}, make)
    return rewrite(
        owner,
        root,
        policy,
        auto_step=auto_step,
        nothing="no residual block found (torchvision-shaped BasicBlock/Bottleneck, "
        "a class with branch/shortcut methods or a transformer layer stack, not "
        "already wrapped); the model is unchanged. Hint: pass target= (a block type or "
        "predicate) for other blocks",
    )


def _active_drop_path(module: nn.Module) -> str | None:
    """``"ConvNextDropPath drop_prob=0.1"`` for a module that already drops its path in
    training (a ``*DropPath`` with ``drop_prob > 0``, a ``StochasticDepth`` with
    ``p > 0``), else ``None``."""
    cls = type(module).__name__
    if _is_drop_path(module) and getattr(module, "drop_prob") > 0:  # noqa: B009
        return f"{cls} drop_prob={getattr(module, 'drop_prob'):g}"  # noqa: B009
    rate = getattr(module, "p", None)
    if cls == "StochasticDepth" and isinstance(rate, float) and rate > 0:
        return f"{cls} p={rate:g}"
    return None


def _is_drop_path(module: nn.Module) -> bool:
    """A model's own DropPath (timm's, Hugging Face ``ConvNextDropPath``, ...): a class
    named ``*DropPath`` with a float ``drop_prob``."""
    return type(module).__name__.endswith("DropPath") and isinstance(
        getattr(module, "drop_prob", None), float
    )


def _warn_on_drop_paths_inside(owner: str, blocks: list[Any], rates: list[float]) -> None:
    """Warns when blocks about to be wrapped already drop their path themselves (a Hugging
    Face ConvNeXt or Swin built with ``drop_path_rate > 0``, a timm block): wrapped, such
    a block is dropped twice in training, at a rate the user did not ask for."""
    found = [
        f"{name}.{inner}: {what}"
        for (name, block, _), rate in zip(blocks, rates, strict=True)
        if rate > 0
        for inner, m in block.named_modules()
        if inner and (what := _active_drop_path(m)) is not None
    ]
    if found:
        shown = "; ".join(found[:3]) + (f"; ... ({len(found)} in all)" if len(found) > 3 else "")
        warnings.warn(
            f"{owner}: blocks being wrapped already drop their path in training ({shown}), "
            "so they are dropped twice; hint: build the model with its own drop-path rate "
            "0 (Hugging Face: drop_path_rate=0.0), or keep its rates and make them seeded "
            "with gyrodrop.surgery.replace_drop_paths(model) instead",
            SurgeryWarning,
            stacklevel=3,
        )


def _given_rates(owner: str, drop_rate: Any) -> float | list[float]:
    """``drop_rate`` checked: one rate, or the flat list of per-block rates (nested
    per-stage sequences flattened)."""
    if isinstance(drop_rate, (str, bytes)) or not isinstance(drop_rate, Sequence):
        return check_p(owner, drop_rate, "drop_rate")
    flat: list[float] = []
    for i, item in enumerate(drop_rate):
        if isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            flat.extend(check_p(owner, r, f"drop_rate[{i}][{j}]") for j, r in enumerate(item))
        else:
            flat.append(check_p(owner, item, f"drop_rate[{i}]"))
    return flat


def remove_stochastic_depth(model: nn.Module) -> int:
    """Undo :func:`gyrodrop.apply_stochastic_depth`: put every wrapped block back in
    place (e.g. to export a plain model after training). Returns the count. Once no
    gyrodrop layer is left, the model-level stepper goes too: the model has exactly
    the hooks it had before surgery."""

    def unwrap(module: nn.Module, _: int) -> nn.Module:
        if isinstance(module, StochasticDepthLayer):
            return module.layer
        assert isinstance(module, StochasticDepthBlock)  # the policy matches only these
        return module.block

    count = replace_modules(model, {StochasticDepthBlock: unwrap, StochasticDepthLayer: unwrap})
    detach_stepper(model)
    return count


def linear_rates(drop_rate: float, count: int) -> list[float]:
    """Rates of ``count`` blocks under the linear rule: block ``i`` gets
    ``drop_rate * (i + 1) / count`` (the last block ``drop_rate``)."""
    return [drop_rate * (i + 1) / count for i in range(count)]


def warmup_steps_for(owner: str, drop_warmup: Any, total_steps: Any) -> int:
    """Steps of warm-up for a fraction ``drop_warmup`` of ``total_steps``."""
    if isinstance(drop_warmup, bool) or not isinstance(drop_warmup, (int, float)):
        raise ValueError(f"{owner}: drop_warmup must be a float in [0, 1], got {drop_warmup!r}")
    if not 0.0 <= float(drop_warmup) <= 1.0:
        raise ValueError(f"{owner}: drop_warmup must be in [0, 1], got {drop_warmup}")
    if total_steps is not None:
        check_int(owner, "total_steps", total_steps, 1)
    if drop_warmup == 0:
        return 0
    if total_steps is None:
        raise ValueError(
            f"{owner}: drop_warmup={drop_warmup} needs total_steps (the number of "
            "optimizer steps of the run) to know when the warm-up ends, got None"
        )
    return max(1, round(float(drop_warmup) * total_steps))


def replace_drop_paths(model: nn.Module, *, mode: Mode = "sample", seed: int = 0) -> int:
    """Swap a model's own DropPath modules for :class:`StochasticDepth`, in place.

    Matches modules whose class is named ``DropPath`` or ends in ``DropPath`` (timm's
    ``DropPath``, Hugging Face ``ConvNextDropPath``, ``SwinDropPath``, ...) and that
    have a float ``drop_prob``; each becomes ``StochasticDepth(drop_prob, mode)`` with
    its own seed derived from ``seed``: the same per-sample rule (``mode="sample"``,
    the default, as in timm) with seeded, resumable, DDP-consistent decisions. The
    model's blocks still compute the branch (``StochasticDepth`` used alone
    multiplies); to skip dropped work, wrap the blocks or layers with
    :func:`gyrodrop.apply_stochastic_depth` instead. Returns the count (0: nothing
    matched, no warning).

    A DropPath whose meaning ``StochasticDepth`` would change is left as it is and
    named in one :class:`~gyrodrop.SurgeryWarning`: timm's ``scale_by_keep=False``
    (kept rows are not scaled by ``1/(1-p)``, so the branch's training expectation is
    ``(1-p) x``, which ``StochasticDepth`` would make ``x``) and a ``drop_prob`` outside
    ``[0, 1)``.

    Example:
        >>> import torch.nn as nn
        >>> class DropPath(nn.Module):
        ...     def __init__(self, drop_prob):
        ...         super().__init__()
        ...         self.drop_prob = drop_prob
        >>> net = nn.Sequential(nn.Linear(2, 2), DropPath(0.1))
        >>> replace_drop_paths(net)
        1
        >>> net[1]
        StochasticDepth(p=0.1, mode=sample, warmup_steps=0, per_rank=False, kept_rows=random)
    """
    config = StochasticDepthConfig(p=0.0, mode=mode, owner="replace_drop_paths")
    check_seed("replace_drop_paths", seed)
    root = unwrap_model(model)
    types = {type(m) for m in root.modules() if _is_drop_path(m)}

    names = {id(m): name for name, m in root.named_modules()}
    left: list[str] = []

    def make(module: nn.Module, index: int) -> nn.Module | None:
        rate = float(getattr(module, "drop_prob"))  # noqa: B009 - typed as Tensor | Module
        reason = _drop_path_differs(module, rate)
        if reason is not None:
            left.append(f"{names[id(module)]} ({type(module).__name__}, {reason})")
            return None
        return StochasticDepth.from_config(config.replace(p=rate), seed=layer_seed(seed, index))

    policy: Policy = dict.fromkeys(types, make)
    count = replace_modules(root, policy) if types else 0
    if left:
        warnings.warn(
            f"replace_drop_paths: replaced {count}; left {len(left)} as they were, whose "
            "meaning StochasticDepth (kept rows scaled by 1/(1-p), p in [0, 1)) would "
            "change: " + "; ".join(left),
            SurgeryWarning,
            stacklevel=2,
        )
    return count


def _drop_path_differs(module: nn.Module, rate: float) -> str | None:
    """Why a DropPath computes something :class:`StochasticDepth` would not, or
    ``None``: timm's ``scale_by_keep=False`` (kept rows not scaled: the branch's
    training expectation is ``(1 - p) x``), or a ``drop_prob`` outside ``[0, 1)``."""
    if not getattr(module, "scale_by_keep", True) and rate != 0.0:  # p = 0: both identity
        return (
            f"drop_prob={rate}, scale_by_keep=False: its kept rows are not scaled, so the "
            f"branch's training mean is {1 - rate:g} x, not x"
        )
    if not 0.0 <= rate < 1.0:
        return f"drop_prob={rate} is outside [0, 1)"
    return None
