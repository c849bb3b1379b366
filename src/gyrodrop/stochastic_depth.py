"""Stochastic depth (Huang et al., ECCV 2016): drop a residual block's branch, keep its
shortcut.

A residual block computes ``post(shortcut(x) + branch(x))``. Stochastic depth replaces
the branch by zero with probability ``p`` during training and scales a kept branch by
``1/(1-p)`` (inverted scaling), so the expected output is unchanged and ``eval()`` is
the plain block: no test-time rescaling, unlike the original paper and Composer.

Two granularities:

- ``mode="block"``: one decision per block per step, for the whole batch. A dropped
  branch is not computed at all (forward and backward), which is where the speed-up
  comes from. The decision is a hash of ``(seed, step)`` only, so every data-parallel
  rank makes the same decision without communicating.
- ``mode="sample"``: one decision per example (dim 0), keyed by the example's row in the
  *global* batch (:func:`gyrodrop.distributed.row_window`), so a DDP run draws exactly
  what one process with the concatenated batch would. The branch is computed for all
  rows (regularization, no saving).

Randomness is counter-based (:mod:`gyrodrop.masks`): no generator state, nothing to
synchronize, and the ``step``/``seed`` buffers resume the exact sequence from a
checkpoint.

Residual blocks are found and wrapped by :func:`gyrodrop.apply_stochastic_depth`; the
wrapper is :class:`StochasticDepthBlock`. How a block exposes its branch and shortcut:

- torchvision-shaped blocks (children ``conv1, bn1, conv2, bn2`` and, for a bottleneck,
  ``conv3, bn3``; optional ``downsample`` or ``shortcut``; optional ``relu``) are
  recognised by structure, and the split is verified once against the block's own
  forward on a small probe input;
- any other block implements the :class:`ResidualBlock` protocol: methods
  ``branch(x)`` and ``shortcut(x)``, and optionally ``post(y)`` (applied to their sum,
  e.g. the final ReLU of a post-activation block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gyrodrop import distributed, masks
from gyrodrop.schedule import SteppedModule, _check_int, check_input, check_p

__all__ = [
    "MODES",
    "ResidualBlock",
    "StochasticDepth",
    "StochasticDepthBlock",
    "stochastic_depth",
    "find_residual_blocks",
    "remove_stochastic_depth",
]

MODES = ("block", "sample")

# Sub-streams of masks.TAG_DEPTH.
_STREAM_BLOCK = 1
_STREAM_SAMPLE = 2
_STREAM_MC = 3


# --------------------------------------------------------------------------------------
# Decisions: pure functions of integers.


def block_keep(seed: int, step: int, p: float) -> bool:
    """Block-mode decision: is the branch kept at ``step``? A pure function of
    ``(seed, step, p)``, identical on every process and device."""
    return masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_BLOCK, step) >= masks.drop_threshold(p)


def _keep_indices(key: int, first: int, n: int, p: float, device: torch.device) -> Tensor:
    """Keep decisions of indices ``[first, first + n)`` under ``key``, bool, shape (n,)."""
    index = torch.arange(first, first + n, dtype=torch.int64, device=device)
    return masks.hash_grid(key, index) >= masks.drop_threshold(p)


def _row_factors(keep: Tensor, ndim: int, p: float, dtype: torch.dtype) -> Tensor:
    """Per-row factors ``keep / (1 - p)``, shaped ``(B, 1, ..., 1)`` to broadcast."""
    factor = keep.to(dtype) * (1.0 / (1.0 - p))
    return factor.reshape(-1, *([1] * (ndim - 1)))


def _check_mode(owner: str, mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")
    return mode


def stochastic_depth(
    x: Tensor,
    p: float,
    mode: str = "block",
    training: bool = True,
    *,
    seed: int = 0,
    step: int = 0,
) -> Tensor:
    """Functional stochastic depth on a residual branch's output. See :class:`StochasticDepth`.

    Args:
        x: the residual branch's output, shape ``(B, *)``.
        p: drop probability in ``[0, 1)``.
        mode: ``"block"`` (one decision for the batch) or ``"sample"`` (one per row).
        training: ``False`` returns ``x`` unchanged.
        seed, step: the decision is a hash of these (and, in sample mode, of the row's
            index in the global batch).

    Returns:
        ``x * keep / (1 - p)``: the same shape and dtype as ``x``. In block mode a
        dropped branch returns ``x * 0`` (the graph is kept; to skip computing the
        branch use :class:`StochasticDepthBlock` or :meth:`StochasticDepth.draw_scale`).

    Example:
        >>> import torch
        >>> y = stochastic_depth(torch.ones(4, 3), 0.5, "block", seed=0, step=0)
        >>> sorted(set(y.flatten().tolist())) in ([0.0], [2.0])
        True
    """
    p = check_p("stochastic_depth", p)
    _check_mode("stochastic_depth", mode)
    if not training or p == 0.0:
        return x
    return x * _factors(x, p, mode, seed, step)


def _factors(x: Tensor, p: float, mode: str, seed: int, step: int) -> Tensor | float:
    """What the branch ``x`` is multiplied by: a float (block mode: 0 or ``1/(1-p)``)
    or per-row factors shaped ``(B, 1, ..., 1)`` (sample mode)."""
    if mode == "block":
        return 1.0 / (1.0 - p) if block_keep(seed, step, p) else 0.0
    if x.dim() == 0:
        raise ValueError(
            "stochastic_depth: sample mode needs a batch dim, shape (B, *), got a 0-d tensor"
        )
    start, _ = distributed.row_window(x.shape[0])
    key = masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_SAMPLE, step)
    keep = _keep_indices(key, start, x.shape[0], p, x.device)
    return _row_factors(keep, x.dim(), p, x.dtype)


# --------------------------------------------------------------------------------------
# The module.


class _MCLayoutError(ValueError):
    """A module saw rows that are not ``passes * rows`` pass-major rows during Monte-Carlo
    passes (:mod:`gyrodrop.uncertainty` then runs one pass per forward)."""


@dataclass(frozen=True)
class _MCDraws:
    """Monte-Carlo sampling state (set by :mod:`gyrodrop.uncertainty` only): the batch
    holds ``rows`` rows per MC sample, the first being sample ``first``; decisions are
    keyed by ``key`` and the (sample, row) index instead of the step. ``passes``: MC
    samples in this forward (``None``: not known); ``single``: the rows each module saw
    in a one-sample forward (by ``id``), to tell examples from other rows."""

    rows: int
    first: int
    key: int
    passes: int | None = None
    single: dict[int, int] | None = None


class StochasticDepth(SteppedModule):
    """Stochastic depth on a residual branch's output: ``forward(branch) -> dropped or
    scaled branch``; add the result to the shortcut.

    Args:
        p: drop probability of the branch, in ``[0, 1)``.
        mode: ``"block"``: the whole batch drops the branch together (one decision per
            step; identical on every DDP rank). ``"sample"``: each example decides
            alone (keyed by its row in the global batch, so DDP matches one process).
        seed: seeds the decisions; a buffer, so it is checkpointed.
        auto_step: ``True``: the step advances by itself, once per training step (per
            training forward of the model after :func:`gyrodrop.apply_stochastic_depth`,
            per call for a module on its own; see :class:`~gyrodrop.GyroDropout`).
            ``False``: call :func:`gyrodrop.step` after each optimizer step.
        warmup_steps: the drop rate ramps linearly from 0 at step 0 to ``p`` at step
            ``warmup_steps`` and stays there (0: no warm-up). Kept branches are scaled
            by the current rate, so the expectation is exact at every step.

    Shape: input ``(B, *)``, output the same. ``eval()``: the identity.

    Used alone it multiplies (a dropped branch was still computed). To skip the work,
    let :func:`gyrodrop.apply_stochastic_depth` wrap the block, or call
    :meth:`draw_scale` before computing the branch.

    Example:
        >>> import torch, gyrodrop
        >>> sd = gyrodrop.StochasticDepth(0.5, "sample", seed=1)
        >>> y = sd(torch.ones(6, 2))
        >>> sorted(set(y.flatten().tolist())) <= [0.0, 2.0]
        True
        >>> int(sd.step)
        1
        >>> bool(torch.equal(sd.eval()(torch.ones(6, 2)), torch.ones(6, 2)))
        True
    """

    def __init__(
        self,
        p: float,
        mode: str = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        owner = type(self).__name__
        p = check_p(owner, p)
        _check_mode(owner, mode)
        _check_int(owner, "warmup_steps", warmup_steps, 0)
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        self.p = p
        self.mode = mode
        self.warmup_steps = int(warmup_steps)
        self._mc: _MCDraws | None = None

    def extra_repr(self) -> str:
        warm = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        return f"p={self.p}, mode={self.mode}{warm}"

    def hparams(self) -> dict[str, Any]:
        """``p``, mode and ``warmup_steps``."""
        return {"p": self.p, "mode": self.mode, "warmup_steps": self.warmup_steps}

    def rate(self, step: int | None = None) -> float:
        """The drop rate at ``step`` (default: the current step): ``p``, ramped linearly
        from 0 over the first ``warmup_steps`` steps."""
        step = self.current_step() if step is None else step
        if self.warmup_steps and step < self.warmup_steps:
            return self.p * max(step, 0) / self.warmup_steps
        return self.p

    @torch.compiler.disable
    def draw_scale(self) -> float:
        """Block mode: this step's factor for the branch, ``0.0`` (dropped: do not
        compute the branch) or ``1/(1-rate)`` (kept); advances the step when
        ``auto_step`` (see :meth:`forward_step`: an activation-checkpoint recompute
        gets the same decision). Call once per training forward, before computing the
        branch::

            scale = self.drop_path.draw_scale()
            out = shortcut if scale == 0.0 else shortcut + scale * self.branch(x)
        """
        if self.mode != "block":
            raise ValueError(
                f"{type(self).__name__}: draw_scale() is for mode='block', got "
                f"mode={self.mode!r}; call the module on the branch output instead"
            )
        if self.step.is_meta:
            return 1.0  # shapes only
        step = self.forward_step()
        p = self.rate(step)
        if p == 0.0:
            return 1.0
        return 1.0 / (1.0 - p) if block_keep(self.current_seed(), step, p) else 0.0

    def _mc_forward(self, x: Tensor, mc: _MCDraws) -> Tensor:
        """Monte-Carlo sampling: block mode decides per MC sample (its ``rows`` rows
        together), sample mode per (sample, row); independent of the step."""
        p = self.p
        if p == 0.0:
            return x
        key = masks.mix_keys(self.current_seed(), masks.TAG_DEPTH, _STREAM_MC, mc.key)
        n = x.shape[0]
        if mc.single is not None and mc.passes == 1:
            mc.single.setdefault(id(self), n)
        examples = mc.single is None or mc.single.get(id(self), mc.rows) == mc.rows
        if mc.passes is not None and (n != mc.passes * mc.rows or not examples):
            # the rows are not the passes' examples (a (B*T, H) flattening, windows)
            if mc.passes != 1:  # the caller then runs one pass per forward
                raise _MCLayoutError(
                    f"{type(self).__name__}: {x.shape[0]} rows for {mc.passes} "
                    f"passes of {mc.rows} examples"
                )
            # one pass: all its rows, keys disjoint from other passes'
            if self.mode == "block":
                keep = _keep_indices(key, mc.first, 1, p, x.device).expand(n)
            else:
                keep = _keep_indices(key ^ 0x5A5A5A5A, mc.first * n, n, p, x.device)
        elif self.mode == "block":
            if x.shape[0] % mc.rows:
                raise ValueError(
                    f"{type(self).__name__}: Monte-Carlo batch of {x.shape[0]} rows is not "
                    f"a multiple of {mc.rows} rows per sample"
                )
            keep = _keep_indices(key, mc.first, x.shape[0] // mc.rows, p, x.device)
            keep = keep.repeat_interleave(mc.rows)
        else:
            keep = _keep_indices(key ^ 0x5A5A5A5A, mc.first * mc.rows, x.shape[0], p, x.device)
        return x * _row_factors(keep, x.dim(), p, x.dtype)

    @torch.compiler.disable
    def _draw(self, x: Tensor) -> Tensor | float:
        """This step's factors for ``x`` (see :func:`stochastic_depth`); advances the
        step when ``auto_step``. Bookkeeping runs eagerly under ``torch.compile``."""
        step = self.forward_step()
        p = self.rate(step)
        if p == 0.0:
            return 1.0
        return _factors(x, p, self.mode, self.current_seed(), step)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        check_input(type(self).__name__, x, rows=self.mode == "sample" or self._mc is not None)
        if self._mc is not None:
            return self._mc_forward(x, self._mc)
        if x.is_meta:
            return x.clone()  # shapes only: no decision, no step
        factor = self._draw(x)
        return x if isinstance(factor, float) and factor == 1.0 else x * factor


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


class _MethodSplit:
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


_Split = _MethodSplit | _ResNetSplit

_BASIC = {"conv1", "bn1", "conv2", "bn2"}
_BOTTLENECK = _BASIC | {"conv3", "bn3"}
_SHORTCUTS = ("downsample", "shortcut")


def _structural_split(block: nn.Module) -> _ResNetSplit | None:
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


def _declares_protocol(block: nn.Module) -> bool:
    """Auto-detection: ``branch`` and ``shortcut`` are methods of the block's class."""
    cls = type(block)
    return callable(getattr(cls, "branch", None)) and callable(getattr(cls, "shortcut", None))


def _targeted_split(block: nn.Module) -> _Split:
    if callable(getattr(block, "branch", None)) and callable(getattr(block, "shortcut", None)):
        return _MethodSplit()
    split = _structural_split(block)
    if split is None:
        raise ValueError(
            f"apply_stochastic_depth: target selected a {type(block).__name__}, which is "
            "neither torchvision-shaped (conv1/bn1/conv2/bn2[/conv3/bn3], optional "
            "downsample and relu, forward = relu(branch + shortcut)) nor a ResidualBlock; "
            "hint: give it methods branch(x) and shortcut(x) (and post(y) if its forward "
            "applies something after the sum), see gyrodrop.stochastic_depth.ResidualBlock"
        )
    return split


Target = type | tuple[type, ...] | Callable[[nn.Module], bool]


def find_residual_blocks(
    model: nn.Module, target: Target | None = None
) -> list[tuple[str, nn.Module, _Split]]:
    """The residual blocks of ``model`` that :func:`gyrodrop.apply_stochastic_depth`
    would wrap, as ``(name, block, split)`` in ``named_modules`` order (input to output
    for sequential nets).

    ``target=None`` finds torchvision-shaped blocks and blocks whose class defines
    ``branch`` and ``shortcut`` methods; a type, tuple of types or predicate selects
    blocks explicitly (each must then be splittable, else ``ValueError``). Blocks
    nested in a selected block and blocks already wrapped are skipped.
    """
    if target is None:
        select: Callable[[nn.Module], bool] | None = None
    elif isinstance(target, type) or (
        isinstance(target, tuple) and all(isinstance(t, type) for t in target)
    ):
        types = target

        def select(m: nn.Module) -> bool:
            return isinstance(m, types)

    elif callable(target):
        select = target
    else:
        raise ValueError(
            "apply_stochastic_depth: target must be None, a module type, a tuple of types "
            f"or a predicate module -> bool, got {target!r}"
        )
    found: list[tuple[str, nn.Module, _Split]] = []
    claimed: list[str] = []  # prefixes of selected or wrapped modules

    def inside(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in claimed)

    for name, module in model.named_modules():
        if not name or inside(name):
            continue
        if isinstance(module, StochasticDepthBlock):
            claimed.append(name)
            continue
        split: _Split | None
        if select is None:
            split = _MethodSplit() if _declares_protocol(module) else _structural_split(module)
        elif select(module):
            split = _targeted_split(module)
        else:
            split = None
        if split is not None:
            found.append((name, module, split))
            claimed.append(name)
    return found


# --------------------------------------------------------------------------------------
# The wrapper.


class StochasticDepthBlock(nn.Module):
    """A residual block with stochastic depth: ``post(shortcut(x) + sd(branch(x)))``.

    Made by :func:`gyrodrop.apply_stochastic_depth`. The original block is kept
    unchanged as the child ``block`` (so its state-dict keys gain a ``block.`` prefix),
    the decisions live in the child ``stochastic_depth`` (a :class:`StochasticDepth`).

    - ``eval()``: exactly ``block(x)``, the block's own forward.
    - training, ``mode="block"``: when the branch is dropped it is not computed, so its
      parameters get no gradient that step (under DDP use
      ``find_unused_parameters=True``).
    - training, ``mode="sample"``: the branch is computed for every row and multiplied
      by per-row factors.

    Args:
        block: the residual block.
        p, mode, seed, auto_step, warmup_steps: see :class:`StochasticDepth`.
        split: how to split the block; found from the block when omitted.
    """

    def __init__(
        self,
        block: nn.Module,
        p: float,
        mode: str = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        split: _Split | None = None,
    ) -> None:
        super().__init__()
        if split is None:
            split = _targeted_split(block)
        self.block = block
        self.stochastic_depth = StochasticDepth(
            p, mode, seed=seed, auto_step=auto_step, warmup_steps=warmup_steps
        )
        self._split = split
        # Take the block's mode (a new module starts in training mode; surgery on a
        # model in eval() must not switch the drops on).
        self.training = self.stochastic_depth.training = block.training

    def extra_repr(self) -> str:
        return f"split={type(self._split).__name__.strip('_')}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.block(x)
        block, split, sd = self.block, self._split, self.stochastic_depth
        if sd.training and sd.mode == "block" and sd._mc is None:
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
        shortcut = split.shortcut(block, x)
        return split.post(block, shortcut + sd(split.branch(block, x)))


def remove_stochastic_depth(model: nn.Module) -> int:
    """Undo :func:`gyrodrop.apply_stochastic_depth`: put every wrapped block back in
    place (e.g. to export a plain model after training). Returns the count."""
    from gyrodrop.surgery import replace_modules

    def unwrap(module: nn.Module, _: int) -> nn.Module:
        assert isinstance(module, StochasticDepthBlock)  # the policy matches only these
        return module.block

    return replace_modules(model, {StochasticDepthBlock: unwrap})


# --------------------------------------------------------------------------------------
# Monte-Carlo support for gyrodrop.uncertainty.


@contextlib.contextmanager
def mc_draws(
    modules: Sequence[StochasticDepth],
    rows: int,
    first: int,
    key: int,
    passes: int | None = None,
    single: dict[int, int] | None = None,
) -> Iterator[None]:
    """Within the block, each :class:`StochasticDepth` in ``modules`` draws one decision
    per Monte-Carlo sample (``rows`` consecutive rows; the batch starts at sample
    ``first``; ``passes`` samples in the batch, when known; ``single``: see
    :class:`_MCDraws`) keyed by ``key``, instead of
    following its step. Block mode then also computes the branch (different samples
    decide differently)."""
    state = _MCDraws(rows=rows, first=first, key=key, passes=passes, single=single)
    previous = [m._mc for m in modules]
    try:
        for m in modules:
            m._mc = state
        yield
    finally:
        for m, prev in zip(modules, previous, strict=True):
            m._mc = prev


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
        _check_int(owner, "total_steps", total_steps, 1)
    if drop_warmup == 0:
        return 0
    if total_steps is None:
        raise ValueError(
            f"{owner}: drop_warmup={drop_warmup} needs total_steps (the number of "
            "optimizer steps of the run) to know when the warm-up ends, got None"
        )
    return max(1, round(float(drop_warmup) * total_steps))
