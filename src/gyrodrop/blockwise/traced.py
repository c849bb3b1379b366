"""The compiled (traced) training path of :class:`~gyrodrop.blockwise.layer.BlockGyroLinear`
on the torch backend: everything the eager path caches is computed in the graph.

:meth:`BlockGyroLinear.forward <gyrodrop.blockwise.layer.BlockGyroLinear.forward>`
calls :func:`traced_forward` when the schedule is traced (``torch.compile``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from gyrodrop import masks
from gyrodrop.blockwise.kernels import compute_dtype, pruned_linear_traced
from gyrodrop.blockwise.plan import build_plan
from gyrodrop.config import BlockGyroConfig, Prune

__all__ = ["TracedLayer", "traced_forward"]


class TracedLayer(Protocol):
    """What :func:`traced_forward` reads of the layer (a ``BlockGyroLinear``)."""

    weight: Tensor
    bias: Tensor | None
    config: BlockGyroConfig
    seed: Tensor
    in_features: int
    out_features: int
    block_size: int
    prune: Prune

    @property
    def n_blocks(self) -> int: ...
    @property
    def n_dropped(self) -> int: ...
    @property
    def features(self) -> int: ...
    @property
    def scale(self) -> float: ...
    def forward_step_tensor(self) -> Tensor: ...
    def active_subnets_tensor(self, step: Tensor) -> Tensor: ...
    def group_counts(self, batch: int) -> list[int]: ...


def traced_forward(layer: TracedLayer, x: Tensor) -> Tensor:
    """The compiled training path (torch backend): the step is a tensor, the kept
    blocks of the active set and the plan's indices are computed from it in the
    graph (the same blocks as the cached eager plan), and the pruned GEMMs are
    differentiable ops the compiler traces (:func:`pruned_linear_traced`)."""
    step = layer.forward_step_tensor()
    if layer.n_dropped == 0 or x.numel() == 0:
        return F.linear(x, layer.weight, layer.bias)
    active = layer.active_subnets_tensor(step)
    keep = masks.block_keep_mask(
        layer.seed, active, layer.n_blocks, layer.n_dropped, device=x.device
    )
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    kept = order[:, : layer.n_blocks - layer.n_dropped]
    batch = x.shape[0]
    rows_per_sample = x.numel() // (batch * layer.in_features)
    out = layer.out_features if layer.prune == "input" else None
    plan = build_plan(kept, layer.group_counts(batch), rows_per_sample, layer.n_blocks, out)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    width = layer.n_blocks * layer.block_size
    weight, bias = layer.weight, layer.bias
    pad = width - layer.features
    if pad and layer.prune == "input":
        x2, weight = F.pad(x2, (0, pad)), F.pad(weight, (0, pad))
    elif pad:
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias, (0, pad))
    y = pruned_linear_traced(
        x2,
        weight,
        bias,
        plan,
        prune=layer.prune,
        block_size=layer.block_size,
        scale=layer.scale,
        dtype=compute_dtype(x),
    )
    if pad and layer.prune == "output":
        y = y[:, : layer.out_features]
    y = y.reshape(*lead, layer.out_features)
    if layer.config.drop_mode != "standard":  # early/late dropout: dense off its steps
        y = torch.where(layer.config.drops_at(step), y, F.linear(x, layer.weight, layer.bias))
    return y
