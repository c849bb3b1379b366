"""DropBlock surgery: a model's ``nn.Dropout2d`` / ``nn.Dropout3d`` layers become DropBlock."""

from __future__ import annotations

import warnings
from typing import Any, cast

from torch import nn

from gyrodrop._modules import replace_modules
from gyrodrop._validation import check_bool, check_p, check_seed
from gyrodrop.config import DropMode
from gyrodrop.dropblock import DropBlock2d, DropBlock3d, GyroDropBlock2d, GyroDropBlock3d
from gyrodrop.masks import layer_seed
from gyrodrop.schedule import attach_stepper
from gyrodrop.surgery.common import SurgeryWarning, check_timing
from gyrodrop.surgery.gyro import ORIGIN

__all__ = ["apply_dropblock"]


def apply_dropblock(
    model: nn.Module,
    *,
    p: float | None = None,
    block_size: int = 7,
    gyro: bool = False,
    num_subnets: int = 64,
    subnets_per_step: int = 4,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    drop_mode: DropMode = "standard",
    drop_cutoff: float | None = None,
    **kw: Any,
) -> int:
    """Replace every ``nn.Dropout2d`` of ``model`` with 2-d DropBlock and every
    ``nn.Dropout3d`` with 3-d DropBlock, in place.

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are looked through).
        p: the drop rate of every layer; ``None`` keeps each ``Dropout2d``'s own ``p``.
        block_size: side of the dropped squares (clamped to each feature map).
        gyro: ``False``: :class:`~gyrodrop.DropBlock2d` / :class:`~gyrodrop.DropBlock3d`
            (a fresh draw every step); ``True``: :class:`~gyrodrop.GyroDropBlock2d` /
            :class:`~gyrodrop.GyroDropBlock3d` with ``num_subnets``,
            ``subnets_per_step`` and ``total_steps`` or ``steps_per_set`` (all layers
            share the schedule seed ``seed``: network-level subnetworks).
        seed: every layer gets its own mask seed derived from this and its position.
        drop_mode: ``"standard"`` (drop all run long), ``"early"`` (drop before the
            cutoff only: early dropout, against underfitting) or ``"late"`` (after it
            only); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps``, in ``(0, 1)``: every layer gets
            ``cutoff_step = round(drop_cutoff * total_steps)``.
        **kw: ``shared_channels``, ``scale``, ``auto_step`` for both; ``warmup_steps``
            (not gyro) and ``schedule`` (gyro only). Stepping is as in
            :func:`apply_gyro_dropout`: one step per training forward of ``model``.

    Returns the number of layers replaced, and warns when it is zero. Layers already
    replaced are left alone; :func:`remove_gyro_dropout` puts the ``Dropout2d`` /
    ``Dropout3d`` back.

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Dropout2d(0.1))
        >>> gyrodrop.apply_dropblock(net, block_size=5)
        1
        >>> net[2]
        DropBlock2d(p=0.1, block_size=5, shared_channels=False, scale=inverted, warmup_steps=0)
    """
    owner = "apply_dropblock"
    if p is not None:
        p = check_p(owner, p)
    check_seed(owner, seed)
    check_bool(owner, "gyro", gyro)
    timing = check_timing(owner, drop_mode, drop_cutoff, total_steps)
    allowed = {"shared_channels", "scale", "auto_step"} | (
        {"schedule"} if gyro else {"warmup_steps"}
    )
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(unknown)} for gyro={gyro}; "
            f"allowed: {sorted(allowed)} besides the named ones"
        )
    if not gyro and (steps_per_set is not None or (total_steps is not None and not timing)):
        raise ValueError(
            f"{owner}: total_steps / steps_per_set schedule gyro DropBlock (total_steps also "
            "places drop_cutoff); pass gyro=True, or warmup_steps= for DropBlock's linear "
            "ramp of p"
        )
    fresh_timing = {**timing, "total_steps": total_steps} if timing else {}
    if gyro and total_steps is None and steps_per_set is None:
        warnings.warn(
            f"{owner}: neither total_steps nor steps_per_set given; using steps_per_set=1",
            SurgeryWarning,
            stacklevel=2,
        )
        steps_per_set = 1

    def make(module: nn.Module, index: int) -> nn.Module:
        rate = cast(float, module.p) if p is None else p
        volume = isinstance(module, nn.Dropout3d)
        new: nn.Module
        if gyro:
            new = (GyroDropBlock3d if volume else GyroDropBlock2d)(
                rate,
                block_size,
                num_subnets,
                subnets_per_step,
                total_steps=total_steps,
                steps_per_set=steps_per_set,
                seed=layer_seed(seed, index),
                schedule_seed=seed,
                **timing,
                **kw,
            )
        else:
            block = DropBlock3d if volume else DropBlock2d
            new = block(rate, block_size, seed=layer_seed(seed, index), **fresh_timing, **kw)
        object.__setattr__(new, ORIGIN, type(module))
        return new

    count = replace_modules(model, {nn.Dropout2d: make, nn.Dropout3d: make})
    if count and kw.get("auto_step", True):
        attach_stepper(model)  # one step per training forward of the model
    if count == 0:
        warnings.warn(
            f"{owner}: no nn.Dropout2d or nn.Dropout3d found; the model is unchanged. Hint: "
            "insert gyrodrop.DropBlock2d (DropBlock3d for volumes) after the conv stages "
            "yourself (the paper uses it after ResNet groups 3 and 4)",
            SurgeryWarning,
            stacklevel=2,
        )
    return count
