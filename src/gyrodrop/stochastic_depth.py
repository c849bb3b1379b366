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
from typing import Any, Literal, Protocol, overload, runtime_checkable

import torch
from torch import Tensor, nn

from gyrodrop import distributed, masks
from gyrodrop._modules import Policy, replace_modules, unwrap_model
from gyrodrop._validation import check_bool, check_choice, check_int, check_p, check_seed
from gyrodrop.masks import layer_seed
from gyrodrop.schedule import SteppedModule, check_input

__all__ = [
    "MODES",
    "ResidualBlock",
    "StochasticDepth",
    "StochasticDepthBlock",
    "stochastic_depth",
    "find_residual_blocks",
    "remove_stochastic_depth",
    "StochasticDepthLayer",
    "layer_list_candidates",
    "replace_drop_paths",
]

#: What one decision drops: the whole batch's branch (``block``) or one sample's.
Mode = Literal["block", "sample"]
MODES: tuple[Mode, ...] = ("block", "sample")

# Sub-streams of masks.TAG_DEPTH.
_STREAM_BLOCK = 1
_STREAM_SAMPLE = 2
_STREAM_MC = 3
_STREAM_RANK = 4


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


def stochastic_depth(
    x: Tensor,
    p: float,
    mode: Mode = "block",
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
    check_choice("stochastic_depth", "mode", mode, MODES)
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
        per_rank: block mode under data parallelism: ``False`` (default): every rank
            makes the same decision; ``True``: each rank decides alone (its rank mixed
            into the seed; Composer's ``use_same_gpu_seed=False``). Sample mode already
            decides per example.

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
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        per_rank: bool = False,
    ) -> None:
        owner = type(self).__name__
        p = check_p(owner, p)
        check_choice(owner, "mode", mode, MODES)
        check_int(owner, "warmup_steps", warmup_steps, 0)
        check_bool(owner, "per_rank", per_rank)
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        self.p = p
        self.mode = mode
        self.warmup_steps = int(warmup_steps)
        self.per_rank = per_rank
        self._mc: _MCDraws | None = None

    def extra_repr(self) -> str:
        warm = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        rank = ", per_rank=True" if self.per_rank else ""
        return f"p={self.p}, mode={self.mode}{warm}{rank}"

    def decision_seed(self) -> int:
        """The seed of the block-mode decisions: the ``seed`` buffer, mixed with this
        process's rank when ``per_rank`` (rank 0 without a process group)."""
        seed = self.current_seed()
        if not self.per_rank:
            return seed
        place = distributed._rank_and_world(None)
        return masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_RANK, 0 if place is None else place[0])

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
        return 1.0 / (1.0 - p) if block_keep(self.decision_seed(), step, p) else 0.0

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
        seed = self.decision_seed() if self.mode == "block" else self.current_seed()
        return _factors(x, p, self.mode, seed, step)

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


@overload
def _targeted_split(block: nn.Module) -> _Split: ...


@overload
def _targeted_split(block: nn.Module, allow_layer: bool) -> _Split | None: ...


def _targeted_split(block: nn.Module, allow_layer: bool = False) -> _Split | None:
    """The split of a block selected by ``target=``; ``None`` (wrap it as a whole layer)
    when ``allow_layer`` and it is not splittable."""
    if callable(getattr(block, "branch", None)) and callable(getattr(block, "shortcut", None)):
        return _MethodSplit()
    split = _structural_split(block)
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


Target = type | tuple[type, ...] | Callable[[nn.Module], bool]


def find_residual_blocks(
    model: nn.Module, target: Target | None = None, example_inputs: Any = None
) -> list[tuple[str, nn.Module, _Split | LayerSplit]]:
    """The residual blocks and layers of ``model`` that
    :func:`gyrodrop.apply_stochastic_depth` would wrap, as ``(name, module, split)`` in
    ``named_modules`` order (input to output for sequential nets); ``split`` is a
    :class:`LayerSplit` for modules wrapped whole (:class:`StochasticDepthLayer`).

    ``target=None`` finds torchvision-shaped blocks, blocks whose class defines
    ``branch`` and ``shortcut`` methods, and the layers of transformer layer stacks
    (:func:`layer_list_candidates`) that keep the shape of their hidden states. A type,
    tuple of types or predicate selects modules explicitly: splittable blocks become
    blocks, anything else a whole layer, which must keep its input's shape
    (``ValueError`` otherwise). Modules nested in a selected one and modules already
    wrapped are skipped.

    Shapes are checked by running the model once in eval mode on ``example_inputs``
    (a tensor, a tuple of positional arguments or a dict of keywords), on probe inputs
    for a Hugging Face model (``pixel_values`` from its config, or its
    ``dummy_inputs``), or by running a layer alone on a probe input built from its first
    ``Linear``/``LayerNorm``/attention/conv; a layer none of these can run is checked at
    its first training forward instead.
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
    found: list[tuple[str, nn.Module, _Split | LayerSplit]] = []
    claimed: list[str] = []  # prefixes of selected or wrapped modules
    layers: list[tuple[str, nn.Module]] = []  # to wrap whole, once shapes are checked

    def inside(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in claimed)

    for name, module in model.named_modules():
        if not name or inside(name):
            continue
        if isinstance(module, (StochasticDepthBlock, StochasticDepthLayer)):
            claimed.append(name)
            continue
        split: _Split | None
        if select is None:
            split = _MethodSplit() if _declares_protocol(module) else _structural_split(module)
        elif select(module):
            split = _targeted_split(module, allow_layer=True)
            if split is None:
                layers.append((name, module))
                claimed.append(name)
                continue
        else:
            split = None
        if split is not None:
            found.append((name, module, split))
            claimed.append(name)
    if select is None:
        layers = [(n, m) for n, m in layer_list_candidates(model) if not inside(n)]
    if layers:
        example = _auto_example(model) if example_inputs is None else example_inputs
        probed = {} if example is None else _probe_shapes(model, [m for _, m in layers], example)
        for name, module in layers:
            probe = _probe_layer(module, probed)
            if probe is None:  # checked at the first training forward
                found.append((name, module, LayerSplit()))
            elif _keeps_shape(*probe):
                found.append((name, module, LayerSplit(_Structure.of(probe[1]))))
            elif select is not None:
                raise _shape_error("apply_stochastic_depth", name, *probe)
            # else: auto-detected but not shape-keeping; not a residual layer
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        found.sort(key=lambda item: order[item[0]])
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
    - a block with its own ``branch``/``shortcut`` methods is checked once, on its first
      training input, against its ``forward`` (eval mode, no gradients): ``ValueError``
      when they differ. torchvision-shaped blocks are checked at surgery.

    Args:
        block: the residual block.
        p, mode, seed, auto_step, warmup_steps, per_rank: see :class:`StochasticDepth`.
        split: how to split the block; found from the block when omitted.
    """

    def __init__(
        self,
        block: nn.Module,
        p: float,
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        split: _Split | None = None,
        per_rank: bool = False,
    ) -> None:
        super().__init__()
        if split is None:
            split = _targeted_split(block)
        self.block = block
        self.stochastic_depth = StochasticDepth(
            p, mode, seed=seed, auto_step=auto_step, warmup_steps=warmup_steps, per_rank=per_rank
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
        with _eval_mode(block), torch.no_grad():
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
        meta = isinstance(x, Tensor) and x.is_meta  # shapes only: nothing to compare
        if not self._verified and isinstance(self._split, _MethodSplit) and not meta:
            self._verify(x)
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

    def unwrap(module: nn.Module, _: int) -> nn.Module:
        if isinstance(module, StochasticDepthLayer):
            return module.layer
        assert isinstance(module, StochasticDepthBlock)  # the policy matches only these
        return module.block

    return replace_modules(model, {StochasticDepthBlock: unwrap, StochasticDepthLayer: unwrap})


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
        check_int(owner, "total_steps", total_steps, 1)
    if drop_warmup == 0:
        return 0
    if total_steps is None:
        raise ValueError(
            f"{owner}: drop_warmup={drop_warmup} needs total_steps (the number of "
            "optimizer steps of the run) to know when the warm-up ends, got None"
        )
    return max(1, round(float(drop_warmup) * total_steps))


# --------------------------------------------------------------------------------------
# Whole layers (transformer layers): the layer is the residual branch plus identity.

#: Names of the ``nn.ModuleList`` attributes that hold a model's stack of layers
#: (Hugging Face ``encoder.layer``, ``model.layers``, GPT-2 ``transformer.h``, ViT/Swin
#: ``blocks``, T5 ``block``; ``nn.TransformerEncoder/Decoder.layers``).
LAYER_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")

#: Keyword names under which a layer may receive its hidden states.
_HIDDEN_KWARGS = ("hidden_states", "src", "tgt", "x", "hidden")


class LayerSplit:
    """Marks a module wrapped as a whole layer (:class:`StochasticDepthLayer`), with
    what it returns when a probe at surgery could run it (``structure``)."""

    def __init__(self, structure: _Structure | None = None) -> None:
        self.structure = structure


def _hidden_of(owner: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The hidden states a layer was called with: its first positional argument, or
    the first of :data:`_HIDDEN_KWARGS` given as a keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for name in _HIDDEN_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, Tensor):
            return value
    raise ValueError(
        f"{owner}: the layer was called without hidden states first (a tensor as the "
        f"first positional argument or one of the keywords {_HIDDEN_KWARGS}); got "
        f"{len(args)} positional and keywords {sorted(kwargs)}"
    )


def _first(out: Any) -> Any:
    """The hidden states a layer returned: the tensor itself, or the first element of
    a tuple/list or of a ``ModelOutput``-like mapping."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if hasattr(out, "to_tuple") and callable(out.to_tuple):
        items = out.to_tuple()
        return items[0] if items else None
    return None


def _with_first(out: Any, hidden: Tensor) -> Any:
    """``out`` with its hidden states replaced by ``hidden`` (same structure)."""
    if isinstance(out, Tensor):
        return hidden
    if isinstance(out, (tuple, list)):
        return type(out)([hidden, *out[1:]]) if isinstance(out, list) else (hidden, *out[1:])
    first_key = next(iter(out.keys()))
    copy = type(out)(**dict(out.items()))
    copy[first_key] = hidden
    return copy


@dataclass(frozen=True)
class _Structure:
    """What a layer returns, learned from one call: to rebuild a pass-through output
    without calling it (other outputs: ``None``, e.g. attention weights)."""

    kind: str  # "tensor" | "tuple" | "list" | "mapping"
    length: int = 1
    cls: type | None = None
    first_key: str | None = None

    @classmethod
    def of(cls, out: Any) -> _Structure:
        if isinstance(out, Tensor):
            return cls("tensor")
        if isinstance(out, (tuple, list)):
            return cls("list" if isinstance(out, list) else "tuple", len(out))
        return cls("mapping", cls=type(out), first_key=next(iter(out.keys())))

    def passthrough(self, hidden: Tensor) -> Any:
        if self.kind == "tensor":
            return hidden
        if self.kind in ("tuple", "list"):
            items = [hidden, *([None] * (self.length - 1))]
            return items if self.kind == "list" else tuple(items)
        assert self.cls is not None and self.first_key is not None
        return self.cls(**{self.first_key: hidden})


def _shape_error(owner: str, name: str, in_shape: Any, out: Any) -> ValueError:
    first = _first(out)
    got = tuple(first.shape) if isinstance(first, Tensor) else type(out).__name__
    return ValueError(
        f"{owner}: layer {name!r} returns hidden states of shape {got} from "
        f"hidden states of shape {tuple(in_shape)}; stochastic depth drops a layer by "
        "passing its input through, so the layer must keep the shape. Hint: select "
        "the shape-keeping layers with target= (e.g. the blocks inside a stage, not "
        "the stage that downsamples)"
    )


class StochasticDepthLayer(nn.Module):
    """A whole layer with stochastic depth: ``y = x + keep * (f(x) - x) / (1 - p)``.

    For layers whose output is their input plus a residual (transformer layers:
    Hugging Face ``BertLayer``, ``ViTLayer``, ``LlamaDecoderLayer``, ...,
    ``nn.TransformerEncoderLayer``). ``forward`` takes the hidden states first (or as
    ``hidden_states=``) and any other arguments (attention masks, position ids or
    embeddings, caches), passed on unchanged; the layer returns the hidden states
    first: a tensor, a tuple/list or a ``ModelOutput``.

    - ``eval()``: exactly ``layer(*args, **kwargs)`` (bitwise).
    - training, ``mode="block"``: when dropped, the layer is not computed and the hidden
      states pass through (other outputs, e.g. attention weights, are ``None``); when
      kept, ``x + (f(x) - x) / (1 - p)``.
    - training, ``mode="sample"``: the layer is computed for every row; row ``b`` gets
      ``x_b + keep_b * (f(x)_b - x_b) / (1 - p)``.

    The first computed output is checked to have the input's shape (``ValueError``
    naming the layer otherwise). Attributes the wrapper lacks are read from the layer
    (model code such as ``nn.TransformerEncoder`` reads its layers' attributes). Made
    by :func:`gyrodrop.apply_stochastic_depth`; the layer is kept as the child
    ``layer`` (state-dict keys gain a ``layer.`` prefix).

    Args:
        layer: the layer.
        p, mode, seed, auto_step, warmup_steps, per_rank: see :class:`StochasticDepth`.
        name: the layer's name in the model, for error messages.
        split: what a probe at surgery learned about the layer's output.
    """

    def __init__(
        self,
        layer: nn.Module,
        p: float,
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        per_rank: bool = False,
        name: str = "",
        split: LayerSplit | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.stochastic_depth = StochasticDepth(
            p, mode, seed=seed, auto_step=auto_step, warmup_steps=warmup_steps, per_rank=per_rank
        )
        self._name = name
        self._structure: _Structure | None = None if split is None else split.structure
        self.training = self.stochastic_depth.training = layer.training

    def extra_repr(self) -> str:
        return f"name={self._name!r}" if self._name else ""

    def __getattr__(self, name: str) -> Any:
        # Attributes the model's own code reads from its layers (nn.TransformerEncoder
        # reads ``layers[0].self_attn``, some Hugging Face models ``attention_type``)
        # come from the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer" or "layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["layer"], name)

    def _hidden_out(self, out: Any, x: Tensor) -> Tensor:
        """The output's hidden states, checked against the input's shape; learns the
        output structure on the first call."""
        h = _first(out)
        if not isinstance(h, Tensor) or h.shape != x.shape:
            raise _shape_error("StochasticDepthLayer", self._name, x.shape, out)
        if self._structure is None:
            self._structure = _Structure.of(out)
        return h

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.layer(*args, **kwargs)
        x = _hidden_of("StochasticDepthLayer", args, kwargs)
        sd = self.stochastic_depth
        if sd.training and sd.mode == "block" and sd._mc is None:
            scale = sd.draw_scale()
            if scale == 0.0 and self._structure is not None:
                return self._structure.passthrough(x)
            out = self.layer(*args, **kwargs)
            h = self._hidden_out(out, x)
            if scale == 0.0:  # dropped before the structure was known: computed once
                return _with_first(out, x)
            if scale == 1.0:
                return out
            return _with_first(out, torch.add(x, h - x, alpha=scale))
        out = self.layer(*args, **kwargs)
        h = self._hidden_out(out, x)
        return _with_first(out, x + sd(h - x))


def _probe_input(module: nn.Module) -> Tensor | None:
    """A small seeded input for ``module`` from its first layer with a known input size
    (``Linear``, ``MultiheadAttention``, ``LayerNorm``, ``Conv``), or ``None``."""
    for m in module.modules():
        size: int | None = None
        weight: Tensor | None = None
        if isinstance(m, nn.Linear):
            size, weight = m.in_features, m.weight
        elif isinstance(m, nn.MultiheadAttention):
            size, weight = m.embed_dim, m.out_proj.weight
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            size, weight = m.normalized_shape[0], m.weight
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
            m, nn.modules.lazy.LazyModuleMixin
        ):
            spatial = m.weight.dim() - 2
            gen = torch.Generator().manual_seed(0x5D)
            x = torch.randn((2, m.in_channels, *([8] * spatial)), generator=gen)
            return x.to(device=m.weight.device, dtype=m.weight.dtype)
        else:
            continue
        if weight is None or weight.device.type == "meta":
            return None
        gen = torch.Generator().manual_seed(0x5D)
        x = torch.randn((2, 3, size), generator=gen)
        return x.to(device=weight.device, dtype=weight.dtype)
    return None


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_shapes(
    model: nn.Module, modules: Sequence[nn.Module], example_inputs: Any
) -> dict[int, tuple[torch.Size, Any]]:
    """Run ``model`` once (eval, no grad) on ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keywords) and record each module's input hidden
    shape and output: ``id(module) -> (shape, output)``. Empty when the run fails."""
    seen: dict[int, tuple[torch.Size, Any]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        with contextlib.suppress(ValueError):
            seen.setdefault(id(m), (_hidden_of("probe", args, kwargs).shape, out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with _eval_mode(model), torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    except Exception:  # noqa: BLE001 - an inconclusive probe: check at the first forward
        seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _auto_example(model: nn.Module) -> Any:
    """Probe inputs for a Hugging Face model built from a config: ``pixel_values`` for
    vision models (``config.image_size``, ``config.num_channels``), else its
    ``dummy_inputs``; ``None`` when neither applies."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "meta":
        return None
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        gen = torch.Generator().manual_seed(0x5D)
        pixels = torch.randn((1, channels, size, size), generator=gen)
        return {"pixel_values": pixels.to(device=first.device, dtype=first.dtype)}
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict):
        return {k: v.to(first.device) if isinstance(v, Tensor) else v for k, v in dummy.items()}
    return None


def _probe_layer(
    module: nn.Module, probed: dict[int, tuple[torch.Size, Any]]
) -> tuple[torch.Size, Any] | None:
    """``(input hidden shape, output)`` of ``module``: from the model probe, else from a
    probe of the module alone; ``None`` when neither could run it."""
    if id(module) in probed:
        return probed[id(module)]
    x = _probe_input(module)
    if x is None:
        return None
    try:
        with _eval_mode(module), torch.no_grad():
            return x.shape, module(x)
    except Exception:  # noqa: BLE001 - needs other arguments: check at first forward
        return None


def _keeps_shape(shape: torch.Size, out: Any) -> bool:
    first = _first(out)
    return isinstance(first, Tensor) and first.shape == shape


def layer_list_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of the model's layer stacks: elements of ``nn.ModuleList`` attributes
    named in :data:`LAYER_LIST_NAMES` whose elements share one class named ``*Layer``
    or ``*Block`` (``BertLayer``, ``LlamaDecoderLayer``, ``GPT2Block``, ...), innermost
    stacks only (Swin's ``blocks`` inside its ``layers`` stages), in ``named_modules`` order."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and name.rpartition(".")[2] in LAYER_LIST_NAMES
        and len(m) > 0
        and len({type(e) for e in m}) == 1
        and not isinstance(m[0], (StochasticDepthBlock, StochasticDepthLayer))
        and type(m[0]).__name__.endswith(("Layer", "Block"))
        and any(True for _ in m[0].parameters())
    ]
    names = [n for n, _ in lists]
    inner = [
        (name, m)
        for name, m in lists
        if not any(other.startswith(name + ".") for other in names if other != name)
    ]
    return [(f"{name}.{i}", layer) for name, m in inner for i, layer in enumerate(m)]


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
        StochasticDepth(p=0.1, mode=sample)
    """
    check_choice("replace_drop_paths", "mode", mode, MODES)
    check_seed("replace_drop_paths", seed)
    root = unwrap_model(model)
    types = {
        type(m)
        for m in root.modules()
        if type(m).__name__.endswith("DropPath")
        and isinstance(getattr(m, "drop_prob", None), float)
    }

    def make(module: nn.Module, index: int) -> nn.Module:
        rate = float(getattr(module, "drop_prob"))  # noqa: B009 - typed as Tensor | Module
        return StochasticDepth(rate, mode, seed=layer_seed(seed, index))

    policy: Policy = dict.fromkeys(types, make)
    return replace_modules(root, policy) if types else 0
