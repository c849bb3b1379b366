"""Stochastic depth on a residual block: how a block splits into branch and shortcut
(structure of torchvision-shaped blocks, or the :class:`ResidualBlock` protocol) and
the wrapper :class:`StochasticDepthBlock` that skips a dropped branch."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Protocol, overload, runtime_checkable

import torch
from torch import Tensor, nn

from gyrodrop.stepping import refuse_export
from gyrodrop.stochastic_depth.module import (
    KeptRows,
    Mode,
    StochasticDepth,
    may_skip_empty_branch,
    row_coupling,
)

__all__ = [
    "ResidualBlock",
    "StochasticDepthBlock",
    "Split",
    "MethodSplit",
    "targeted_split",
    "structural_split",
    "declares_protocol",
    "eval_mode",
]

# --------------------------------------------------------------------------------------
# How a block splits into branch and shortcut.


@runtime_checkable
class ResidualBlock(Protocol):
    """What a user block selected with ``apply_stochastic_depth(target=...)`` provides.

    The block's ``forward(x)`` must equal ``post(shortcut(x) + branch(x))`` (``post``
    defaults to the identity). In training the wrapper calls these pieces (and skips
    ``branch`` when it is dropped); in eval it calls the block's own ``forward``.
    ``post`` may modify its input in place: when the branch is dropped and the shortcut
    returned ``x`` itself, ``post`` receives a copy.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class PreActBlock(nn.Module):
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)
        ...
        ...     def branch(self, x):
        ...         return self.fc(self.norm(x))
        ...
        ...     def shortcut(self, x):
        ...         return x
        ...
        ...     def forward(self, x):
        ...         return self.shortcut(x) + self.branch(x)
        >>> isinstance(PreActBlock(4), ResidualBlock)
        True
    """

    def branch(self, x: Tensor) -> Tensor: ...

    def shortcut(self, x: Tensor) -> Tensor: ...


class MethodSplit:
    """A block implementing :class:`ResidualBlock`."""

    def branch(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.branch(x)  # type: ignore[operator]

    def shortcut(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.shortcut(x)  # type: ignore[operator]

    def post(self, block: nn.Module, y: Tensor) -> Tensor:
        post = getattr(block, "post", None)
        return y if post is None else post(y)

    def has_post(self, block: nn.Module) -> bool:
        return callable(getattr(block, "post", None))


class _ResNetSplit:
    """A torchvision-shaped BasicBlock (``bottleneck=False``) or Bottleneck block:
    ``branch = bn2(conv2(act(bn1(conv1(x)))))`` (bottleneck: ``... act, conv3, bn3``),
    ``shortcut = downsample(x)`` (or ``shortcut(x)``, or ``x``), ``post = act``."""

    def __init__(self, bottleneck: bool, shortcut_name: str | None, act_name: str | None):
        self.bottleneck = bottleneck
        self.shortcut_name = shortcut_name
        self.act_name = act_name

    def _act(self, block: nn.Module, y: Tensor) -> Tensor:
        if self.act_name is None:
            return torch.relu(y)
        return block.get_submodule(self.act_name)(y)

    def branch(self, block: nn.Module, x: Tensor) -> Tensor:
        m = block._modules
        out = self._act(block, m["bn1"](m["conv1"](x)))  # type: ignore[misc]
        out = m["bn2"](m["conv2"](out))  # type: ignore[misc]
        if self.bottleneck:
            out = m["bn3"](m["conv3"](self._act(block, out)))  # type: ignore[misc]
        return out

    def shortcut(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.shortcut_name is None:
            return x
        return block.get_submodule(self.shortcut_name)(x)

    def post(self, block: nn.Module, y: Tensor) -> Tensor:
        return self._act(block, y)

    def has_post(self, block: nn.Module) -> bool:
        return True


Split = MethodSplit | _ResNetSplit

_BASIC = {"conv1", "bn1", "conv2", "bn2"}
_BOTTLENECK = _BASIC | {"conv3", "bn3"}
_SHORTCUTS = ("downsample", "shortcut")


def structural_split(block: nn.Module) -> _ResNetSplit | None:
    """The split of a torchvision-shaped block, or ``None`` when the children do not
    match exactly (any extra child: the block may do more than we would replay)."""
    names = set(block._modules)  # includes children set to None
    children = {n for n, m in block._modules.items() if m is not None}
    if not _BASIC.issubset(children):
        return None
    bottleneck = {"conv3", "bn3"} <= children
    core = _BOTTLENECK if bottleneck else _BASIC
    shortcut_names = [n for n in _SHORTCUTS if n in children]
    if len(shortcut_names) > 1:
        return None
    act = "relu" if "relu" in children else None
    expected = core | set(shortcut_names) | ({act} if act else set())
    if children != expected or not (names - children) <= set(_SHORTCUTS):
        return None
    if any(True for _ in block.parameters(recurse=False)) or any(
        True for _ in block.buffers(recurse=False)
    ):
        return None
    conv1 = block._modules["conv1"]
    if not isinstance(conv1, nn.modules.conv._ConvNd) or isinstance(
        conv1, nn.modules.lazy.LazyModuleMixin
    ):
        return None
    split = _ResNetSplit(bottleneck, shortcut_names[0] if shortcut_names else None, act)
    return split if _probe_matches(block, split, conv1) else None


def _probe_matches(block: nn.Module, split: _ResNetSplit, conv1: nn.modules.conv._ConvNd) -> bool:
    """Does ``post(shortcut(x) + branch(x))`` equal ``block(x)`` in eval mode on a
    small seeded input? Catches blocks whose forward differs from the torchvision one.
    The block's modes are restored; eval-mode BatchNorm updates no statistics."""
    weight = conv1.weight
    if weight.device.type == "meta":
        return True  # nothing to compute on; trust the structure
    spatial = weight.dim() - 2
    gen = torch.Generator().manual_seed(0x5D)
    shape = (2, conv1.in_channels, *([8] * spatial))
    x = torch.randn(shape, generator=gen).to(device=weight.device, dtype=weight.dtype)
    modes = [(m, m.training) for m in block.modules()]
    try:
        block.eval()
        with torch.no_grad():
            expected = block(x)
            shortcut = split.shortcut(block, x)
            got = split.post(block, shortcut + split.branch(block, x))
    except Exception:  # noqa: BLE001 - any failure means "not this structure"
        return False
    finally:
        for m, mode in modes:
            m.training = mode
    return (
        isinstance(expected, Tensor)
        and expected.shape == got.shape
        and bool(torch.allclose(expected, got, rtol=1e-4, atol=1e-5))
    )


def declares_protocol(block: nn.Module) -> bool:
    """Auto-detection: ``branch`` and ``shortcut`` are methods of the block's class."""
    cls = type(block)
    return callable(getattr(cls, "branch", None)) and callable(getattr(cls, "shortcut", None))


@overload
def targeted_split(block: nn.Module) -> Split: ...


@overload
def targeted_split(block: nn.Module, allow_layer: bool) -> Split | None: ...


def targeted_split(block: nn.Module, allow_layer: bool = False) -> Split | None:
    """The split of a block selected by ``target=``; ``None`` (wrap it as a whole layer)
    when ``allow_layer`` and it is not splittable."""
    if callable(getattr(block, "branch", None)) and callable(getattr(block, "shortcut", None)):
        return MethodSplit()
    split = structural_split(block)
    if split is None and allow_layer:
        return None
    if split is None:
        raise ValueError(
            f"apply_stochastic_depth: target selected a {type(block).__name__}, which is "
            "neither torchvision-shaped (conv1/bn1/conv2/bn2[/conv3/bn3], optional "
            "downsample and relu, forward = relu(branch + shortcut)) nor a ResidualBlock; "
            "hint: give it methods branch(x) and shortcut(x) (and post(y) if its forward "
            "applies something after the sum), see gyrodrop.stochastic_depth.ResidualBlock"
        )
    return split


# --------------------------------------------------------------------------------------
# The wrapper.


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class StochasticDepthBlock(nn.Module):
    """A residual block with stochastic depth: ``post(shortcut(x) + sd(branch(x)))``.

    Made by :func:`gyrodrop.apply_stochastic_depth`. The original block is kept
    unchanged as the child ``block`` (so its state-dict keys gain a ``block.`` prefix),
    the decisions live in the child ``stochastic_depth`` (a :class:`StochasticDepth`).

    - ``eval()``: exactly ``block(x)``, the block's own forward.
    - training, ``mode="block"``: when the branch is dropped it is not computed, so its
      parameters get no gradient that step (under DDP use
      ``find_unused_parameters=True``).
    - training, ``mode="sample"``: per-row decisions; a branch whose rows are
      independent is computed on the kept rows only and added back into the shortcut
      (``index_add``); a block that couples rows (BatchNorm in training, as every
      torchvision-shaped block) computes every row and multiplies, saying so once.
    - a block with its own ``branch``/``shortcut`` methods is checked once, on its first
      training input, against its ``forward`` (eval mode, no gradients): ``ValueError``
      when they differ. torchvision-shaped blocks are checked at surgery.

    Args:
        block: the residual block.
        p, mode, seed, auto_step, warmup_steps, per_rank, kept_rows: see
            :class:`StochasticDepth`.
        split: how to split the block; found from the block when omitted.
    """

    _warned_rows = False  # said once why sample mode multiplies (class default: old pickles)

    def __init__(
        self,
        block: nn.Module,
        p: float,
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        split: Split | None = None,
        per_rank: bool = False,
        kept_rows: KeptRows = "random",
    ) -> None:
        super().__init__()
        if split is None:
            split = targeted_split(block)
        self.block = block
        self.stochastic_depth = StochasticDepth(
            p,
            mode,
            seed=seed,
            auto_step=auto_step,
            warmup_steps=warmup_steps,
            per_rank=per_rank,
            kept_rows=kept_rows,
        )
        self._split = split
        self._verified = False  # a user's branch/shortcut, checked on the first input
        # Take the block's mode (a new module starts in training mode; surgery on a
        # model in eval() must not switch the drops on).
        self.training = self.stochastic_depth.training = block.training

    def extra_repr(self) -> str:
        return f"split={type(self._split).__name__.strip('_')}"

    def _verify(self, x: Tensor) -> None:
        """Once, on the first training input: does the block's own ``forward`` equal
        ``post(shortcut(x) + branch(x))``? Run in eval mode without gradients (no
        dropout, no BatchNorm statistics updated); ``ValueError`` naming the methods
        when not."""
        block, split = self.block, self._split
        with eval_mode(block), torch.no_grad():
            expected = block(x.clone())
            got = split.post(block, split.shortcut(block, x.clone()) + split.branch(block, x))
        if not (
            isinstance(expected, Tensor)
            and expected.shape == got.shape
            and bool(torch.allclose(expected, got, rtol=1e-4, atol=1e-5))
        ):
            raise ValueError(
                f"StochasticDepthBlock: {type(block).__name__}.forward(x) differs from "
                "post(shortcut(x) + branch(x)) on the first training input; stochastic "
                "depth would train a different network than the block's forward. Hint: "
                "make branch(x), shortcut(x) (and post(y)) reproduce the forward"
            )
        self._verified = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.block(x)
        refuse_export(type(self).__name__)  # before _verify runs the block on x
        meta = isinstance(x, Tensor) and x.is_meta  # shapes only: nothing to compare
        if not self._verified and isinstance(self._split, MethodSplit) and not meta:
            self._verify(x)
        block, split, sd = self.block, self._split, self.stochastic_depth
        if sd.training and sd.mode == "block" and not sd.mc_active:
            scale = 1.0 if isinstance(x, Tensor) and x.is_meta else sd.draw_scale()
            shortcut = split.shortcut(block, x)
            if scale == 0.0:
                if shortcut is x and split.has_post(block):
                    shortcut = x.clone()  # post may work in place; x belongs to the caller
                return split.post(block, shortcut)
            branch = split.branch(block, x)
            if scale == 1.0:
                return split.post(block, shortcut + branch)
            return split.post(block, torch.add(shortcut, branch, alpha=scale))
        if sd.training and sd.mode == "sample" and not sd.mc_active and self._skippable(x):
            shortcut = split.shortcut(block, x)
            draw = sd.draw_rows(x.shape[0], x.device)
            if draw is not None and draw.index is not None:
                index = draw.index
                if index.shape[0] == 0 and may_skip_empty_branch():
                    if shortcut is x and split.has_post(block):
                        shortcut = x.clone()  # post may work in place
                    return split.post(block, shortcut)
                branch = split.branch(block, x.index_select(0, index))
                assert isinstance(draw.scale, float)
                return split.post(block, shortcut.index_add(0, index, branch, alpha=draw.scale))
            branch = split.branch(block, x)
            return split.post(
                block, shortcut + (branch if draw is None else branch * draw.factors(branch))
            )
        shortcut = split.shortcut(block, x)
        return split.post(block, shortcut + sd(split.branch(block, x)))

    def _skippable(self, x: Tensor) -> bool:
        """Can sample mode compute the branch on the kept rows only? Not when the block
        couples rows (BatchNorm in training, as in every torchvision-shaped block) or
        draws by row position (:func:`~gyrodrop.stochastic_depth.module.row_coupling`):
        then it multiplies, and says so once naming the block."""
        if not isinstance(x, Tensor) or x.is_meta or x.dim() == 0:
            return False
        reason = row_coupling(self.block)
        if reason is None:
            return True
        if not self._warned_rows and not torch.compiler.is_compiling():
            self._warned_rows = True
            warnings.warn(
                f"StochasticDepthBlock ({type(self.block).__name__}): sample mode computes "
                f"the branch on every row and multiplies the dropped rows by 0 (no "
                f"saving): {reason}",
                UserWarning,
                stacklevel=3,
            )
        return False
