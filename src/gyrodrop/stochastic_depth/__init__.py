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
  what one process with the concatenated batch would. The wrappers compute a branch
  whose rows are independent on the kept rows only and add it back (``index_add``):
  the dropped rows' work is saved; a branch that couples rows (BatchNorm in training)
  is computed for every row and multiplied. ``kept_rows="fixed"`` keeps exactly
  ``B - round(p * B)`` rows per step (static shapes, for ``torch.compile``).

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

from typing import Any

from gyrodrop.stochastic_depth.block import (
    MethodSplit,
    ResidualBlock,
    Split,
    StochasticDepthBlock,
    declares_protocol,
    eval_mode,
    structural_split,
    targeted_split,
)
from gyrodrop.stochastic_depth.layer import (
    LAYER_LIST_NAMES,
    LayerSplit,
    StochasticDepthLayer,
    Structure,
    first_output,
    hidden_of,
    shape_error,
)
from gyrodrop.stochastic_depth.module import (
    KEPT_ROWS,
    MODES,
    KeptRows,
    MCDraws,
    MCLayoutError,
    Mode,
    RowDraw,
    StochasticDepth,
    block_keep,
    draw_rows,
    row_coupling,
    stochastic_depth,
)
from gyrodrop.stochastic_depth.rates import RATE_DISTRIBUTIONS, RateDistribution, depth_rates

__all__ = [
    "MODES",
    "Mode",
    "KEPT_ROWS",
    "KeptRows",
    "RowDraw",
    "draw_rows",
    "row_coupling",
    "ResidualBlock",
    "StochasticDepth",
    "StochasticDepthBlock",
    "StochasticDepthLayer",
    "LayerSplit",
    "block_keep",
    "stochastic_depth",
    "depth_rates",
    "RateDistribution",
    "RATE_DISTRIBUTIONS",
    "MCDraws",
    "MCLayoutError",
    "LAYER_LIST_NAMES",
    "MethodSplit",
    "Split",
    "Structure",
    "declares_protocol",
    "eval_mode",
    "first_output",
    "hidden_of",
    "shape_error",
    "structural_split",
    "targeted_split",
]

# The stochastic-depth surgery functions live in gyrodrop.surgery (one floor up); users
# reached two of them here before, so these names still resolve, lazily (not an import
# of this floor, so the import graph keeps going down).
_SURGERY_NAMES = ("remove_stochastic_depth", "replace_drop_paths")


def __getattr__(name: str) -> Any:
    if name in _SURGERY_NAMES:
        import importlib

        return getattr(importlib.import_module("gyrodrop.surgery.stochastic_depth"), name)
    raise AttributeError(f"module 'gyrodrop.stochastic_depth' has no attribute {name!r}")
