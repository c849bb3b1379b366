"""DropBlock surgery: a model's ``nn.Dropout2d`` / ``nn.Dropout3d`` layers become DropBlock."""

from __future__ import annotations

from typing import Any

from torch import nn

from gyrodrop._modules import check_model
from gyrodrop._validation import check_bool, check_seed
from gyrodrop.config import DropBlockConfig, DropMode, GyroDropBlockConfig
from gyrodrop.dropblock import DropBlock2d, DropBlock3d, GyroDropBlock2d, GyroDropBlock3d
from gyrodrop.masks import layer_seed
from gyrodrop.stepping import SteppedModule
from gyrodrop.surgery.common import one_schedule_warning, rewrite
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
    check_model(owner, model)
    check_seed(owner, seed)
    check_bool(owner, "gyro", gyro)
    auto_step = check_bool(owner, "auto_step", kw.pop("auto_step", True))
    allowed = {"shared_channels", "scale"} | ({"schedule"} if gyro else {"warmup_steps"})
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(unknown)} for gyro={gyro}; "
            f"allowed: {sorted(allowed | {'auto_step'})} besides the named ones"
        )
    if not gyro and (
        steps_per_set is not None or (total_steps is not None and drop_mode == "standard")
    ):
        raise ValueError(
            f"{owner}: total_steps / steps_per_set schedule gyro DropBlock (total_steps also "
            "places drop_cutoff); pass gyro=True, or warmup_steps= for DropBlock's linear "
            "ramp of p"
        )
    timing: dict[str, Any] = {
        "drop_mode": drop_mode,
        "drop_cutoff": drop_cutoff,
        "total_steps": total_steps,
    }
    config: DropBlockConfig | GyroDropBlockConfig
    if gyro:
        with one_schedule_warning(owner, total_steps, steps_per_set):
            config = GyroDropBlockConfig(
                p=0.1 if p is None else p,
                block_size=block_size,
                num_subnets=num_subnets,
                subnets_per_step=subnets_per_step,
                steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
                owner=owner,
                **timing,
                **kw,
            )
    else:
        config = DropBlockConfig(
            p=0.1 if p is None else p, block_size=block_size, owner=owner, **timing, **kw
        )

    def make(module: nn.Module, index: int) -> nn.Module:
        layer = config if p is not None else config.replace(owner=owner, p=module.p)
        options: dict[str, Any] = {"seed": layer_seed(seed, index), "auto_step": auto_step}
        volume = isinstance(module, nn.Dropout3d)
        if gyro:
            options.update(schedule_seed=seed, total_steps=total_steps)
            block: type[SteppedModule] = GyroDropBlock3d if volume else GyroDropBlock2d
        else:
            block = DropBlock3d if volume else DropBlock2d
        new = block.from_config(layer, **options)
        object.__setattr__(new, ORIGIN, type(module))
        return new

    return rewrite(
        owner,
        model,
        {nn.Dropout2d: make, nn.Dropout3d: make},
        auto_step=auto_step,
        nothing="no nn.Dropout2d or nn.Dropout3d found; the model is unchanged. Hint: "
        "insert gyrodrop.DropBlock2d (DropBlock3d for volumes) after the conv stages "
        "yourself (the paper uses it after ResNet groups 3 and 4)",
    )
