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

from gyrodrop.gyro import GyroDropout
from gyrodrop.masks import mix_keys
from gyrodrop.schedule import check_p, check_seed

__all__ = ["apply_gyro_dropout", "unwrap_model", "replace_modules", "layer_seed"]

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
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced += 1
    return replaced


_CHANNELWISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


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

    ``Dropout1d/2d/3d`` become channel-wise masks (``dims=(1,)``). ``p=None`` keeps each
    layer's own ``p``. Every layer gets its own seed derived from ``seed`` and its
    position. Layers already replaced are left alone. Other keyword arguments
    (``schedule``, ``scale``, ``dims``, ``auto_step``) go to every ``GyroDropout``.

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
