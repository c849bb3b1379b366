"""The user's controls of stepping: :func:`set_stepping` (who advances the step),
:func:`bind_to_optimizer` (one step per ``optimizer.step()``) and :func:`step` (advance
by hand). The stepper they drive and the stepped base module are
:mod:`gyrodrop.stepping`'s; :mod:`gyrodrop.schedule` re-exports these names."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from gyrodrop._validation import check_step_count
from gyrodrop.stepping import SteppedModule, _ModelStepper, _unwrap, attach_stepper

__all__ = ["Stepping", "STEPPING", "set_stepping", "bind_to_optimizer", "step"]

Stepping = Literal["forward", "manual"]
STEPPING: tuple[Stepping, ...] = ("forward", "manual")


def set_stepping(model: nn.Module, when: Stepping) -> None:
    """Choose who advances the step of every gyrodrop module in ``model``.

    - ``"forward"`` (what the ``apply_*`` functions set up): one step after each
      training-mode forward of ``model``, however often each layer is called.
    - ``"manual"``: only :func:`gyrodrop.step` advances them (``auto_step=False``;
      what the trainer callbacks use, they step once per optimizer step).

    For one step per ``optimizer.step()`` use :func:`bind_to_optimizer`.

    Example:
        >>> import torch, gyrodrop
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5))
        >>> _ = gyrodrop.apply_gyro_dropout(
        ...     model, num_subnets=8, subnets_per_step=2, steps_per_set=1
        ... )
        >>> gyrodrop.set_stepping(model, "manual")
        >>> _ = model(torch.ones(4, 4))
        >>> int(model[1].step)
        0
        >>> gyrodrop.step(model)
        >>> int(model[1].step)
        1

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``when`` is not ``"forward"`` or ``"manual"``.
    """
    root = _unwrap("set_stepping", model)
    if when not in STEPPING:
        raise ValueError(
            f"set_stepping: when must be one of {STEPPING}, got {when!r}; "
            "for one step per optimizer step use gyrodrop.bind_to_optimizer(model, optimizer)"
        )
    stepped = [m for m in root.modules() if isinstance(m, SteppedModule)]
    for module in stepped:
        module.auto_step = when == "forward"
        if when == "manual":
            module._stepper = None
    stepper = root.__dict__.get("_gyrodrop_stepper")
    if isinstance(stepper, _ModelStepper) and stepper.optimizer_hook is not None:
        stepper.optimizer_hook.remove()
        stepper.optimizer_hook = None
    if when == "forward":
        attach_stepper(root)
        root.__dict__["_gyrodrop_stepper"].when = "forward"


def bind_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Advance every gyrodrop module of ``model`` by one after each
    ``optimizer.step()``, instead of after each forward: the way to keep the schedule
    with gradient accumulation (several forwards per optimizer step) in plain PyTorch.

    All forwards between two optimizer steps use the same masks. Binding again (to
    another optimizer) replaces the binding; :func:`set_stepping` undoes it. A copy of
    the model (``copy.deepcopy``, pickling) is not bound: bind it again. Do not also
    call :func:`gyrodrop.step`.

    Example:
        >>> import torch, gyrodrop
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5))
        >>> _ = gyrodrop.apply_gyro_dropout(
        ...     model, num_subnets=8, subnets_per_step=2, steps_per_set=1
        ... )
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> gyrodrop.bind_to_optimizer(model, opt)
        >>> for _ in range(3):  # three micro-batches of one optimizer step
        ...     model(torch.ones(4, 4)).sum().backward()
        >>> int(model[1].step)
        0
        >>> opt.step()
        >>> int(model[1].step)
        1

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not a
            ``torch.optim.Optimizer``.
    """
    root = _unwrap("bind_to_optimizer", model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"bind_to_optimizer: optimizer must be a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    for module in root.modules():
        if isinstance(module, SteppedModule):
            module.auto_step = True
    attach_stepper(root)
    stepper: _ModelStepper = root.__dict__["_gyrodrop_stepper"]
    if stepper.optimizer_hook is not None:
        stepper.optimizer_hook.remove()
    stepper.when = "optimizer"

    def after_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
        if root.__dict__.get("_gyrodrop_stepper") is stepper and stepper.when == "optimizer":
            stepper.advance(root)

    stepper.optimizer_hook = optimizer.register_step_post_hook(after_step)


def step(model: nn.Module, n: int = 1) -> None:
    """Advance every gyrodrop module in ``model`` by ``n`` steps.

    Call after each optimizer step when the modules step manually (built with
    ``auto_step=False``, or after ``set_stepping(model, "manual")``). With the default
    settings the model steps itself (see :func:`attach_stepper`); for gradient
    accumulation prefer :func:`bind_to_optimizer`.

    Args:
        model: any module; every gyrodrop module inside it (``GyroDropout``,
            ``BlockGyroLinear``, ``StochasticDepth``, ...) advances, nothing else changes.
        n: steps to advance, an int ``>= 0``, default 1.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``n`` is not an int ``>= 0``.

    Example:
        >>> import torch, gyrodrop
        >>> drop = gyrodrop.GyroDropout(0.5, 16, 4, steps_per_set=10, auto_step=False)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), drop)
        >>> _ = model(torch.ones(8, 4))  # two forwards of one accumulated step ...
        >>> _ = model(torch.ones(8, 4))
        >>> gyrodrop.step(model)  # ... then one optimizer step
        >>> int(drop.step)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gyrodrop.step: model must be an nn.Module, got {type(model).__name__}")
    check_step_count("gyrodrop.step", "n", n)
    for module in model.modules():
        if isinstance(module, SteppedModule):
            module.advance(n)
