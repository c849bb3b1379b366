"""Module-tree helpers shared by stepping, surgery and prediction (the bottom layer).

- :func:`unwrap_model`: the user's module inside DDP / DataParallel /
  ``torch.compile`` wrappers;
- :func:`device_of`: where a module's tensors live;
- :func:`set_submodule` and :func:`swap_all`: put modules in place by dotted name, in
  every parent that holds the replaced module (a module shared by two parents is
  replaced in both), all parents looked up before the first write;
- :func:`replace_modules`: the surgery policy (module type -> replacement function).

Nothing here imports another gyrodrop module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "Policy",
    "unwrap_model",
    "check_model",
    "device_of",
    "set_submodule",
    "swap_all",
    "replace_modules",
]

#: Surgery policy: exact module type -> function ``(module, match index) -> replacement``
#: (``None`` leaves the module alone).
Policy = Mapping[type, Callable[[nn.Module, int], nn.Module | None]]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers
    (nested wrappers too); any other module is returned as is."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def check_model(owner: str, model: Any, error: type[Exception] = ValueError) -> nn.Module:
    """``model`` unwrapped (:func:`unwrap_model`); ``error`` (``ValueError`` by default)
    naming ``owner`` when it is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise error(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    return unwrap_model(model)


def device_of(module: nn.Module, fallback: torch.device | None = None) -> torch.device | None:
    """The device of ``module``'s first parameter, else of its first buffer, else
    ``fallback``."""
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return fallback


def _parents_of(root: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` of ``root``'s tree that holds the module at the
    dotted ``name`` (one entry unless the module is shared)."""
    if not name:
        raise ValueError("replace_modules: cannot replace the root module itself")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent.get_submodule(child)
    places = [(parent, child)]
    for owner in root.modules():
        for attr, sub in owner._modules.items():
            if sub is old and (owner is not parent or attr != child):
                places.append((owner, attr))
    return places


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` of ``root`` (``"encoder.layer.0.dropout"``),
    in every parent that holds the module now there."""
    swap_all(root, [(name, new)])


def swap_all(root: nn.Module, swaps: list[tuple[str, nn.Module]]) -> None:
    """Set every ``(dotted name, new module)`` of ``swaps`` in ``root``; all parents are
    looked up before the first write, so a bad name leaves ``root`` unchanged.

    Raises:
        ValueError: a name is empty (the root cannot replace itself).
        AttributeError: a name does not exist in ``root``.
    """
    targets = [(place, new) for name, new in swaps for place in _parents_of(root, name)]
    for (parent, child), new in targets:
        setattr(parent, child, new)


def replace_modules(model: nn.Module, policy: Policy) -> int:
    """Replace every module whose exact type is in ``policy``; returns the count.

    Matches are visited in ``named_modules`` order; the policy function gets the module
    and its match index and may return ``None`` to leave the module alone. Each
    replacement goes on the replaced module's device (else the model's) and copies its
    train/eval mode. All replacements are built first and swapped in only when every
    one was built: when the policy raises, the model is unchanged.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, or the policy matches the root.
    """
    model = check_model("replace_modules", model)
    device = device_of(model)
    matches = [(name, module) for name, module in model.named_modules() if type(module) in policy]
    swaps: list[tuple[str, nn.Module]] = []
    for index, (name, module) in enumerate(matches):
        new = policy[type(module)](module, index)
        if new is None:
            continue
        if not name:
            raise ValueError("replace_modules: cannot replace the root module itself")
        target = device_of(module, device)
        if target is not None:
            new = new.to(target)
        new.train(module.training)
        swaps.append((name, new))
    swap_all(model, swaps)
    return len(swaps)
