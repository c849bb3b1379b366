"""What the trainer callbacks share: surgery with trainer-owned stepping, the deferred
``total_steps``, and the per-module step state saved next to a checkpoint.

Neither trainer knows its number of optimizer steps when the model must be rewritten:
the rewrite has to happen before a checkpoint's weights are loaded (so the ``step`` and
``seed`` buffers exist to receive them), and the step count is only known once the data
is set up. So the callbacks rewrite early with a provisional ``steps_per_set`` and set
the real one from the trainer's step count before the first training step. The modules
whose schedule the trainer decides carry the attribute :data:`TRAINER_SCHEDULED`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from gyrodrop._modules import unwrap_model
from gyrodrop._validation import check_seed
from gyrodrop.config import GyroDropoutConfig
from gyrodrop.schedule import TRAINER_SCHEDULED, SteppedModule, set_stepping, step
from gyrodrop.scheduled import ScheduledModule
from gyrodrop.surgery import apply_gyro_dropout

__all__ = [
    "TRAINER_SCHEDULED",
    "GyroOptions",
    "stepped_modules",
    "apply",
    "set_total_steps",
    "advance",
    "gyro_steps",
    "load_gyro_steps",
]

#: Attribute set (to ``True``) on the modules whose ``total_steps`` the trainer sets
#: (:data:`gyrodrop.schedule.TRAINER_SCHEDULED`).

_PASS_THROUGH = {"dims", "schedule", "scale", "total_steps", "steps_per_set"}


class GyroOptions:
    """Validated arguments of a callback, forwarded to :func:`gyrodrop.apply_gyro_dropout`."""

    def __init__(
        self,
        owner: str,
        p: float | None,
        num_subnets: int,
        subnets_per_step: int,
        seed: int,
        kw: Mapping[str, Any],
    ) -> None:
        if "auto_step" in kw:
            raise TypeError(
                f"{owner}: auto_step is not an option: the callback advances the schedule "
                "once per optimizer step"
            )
        unknown = set(kw) - _PASS_THROUGH
        if unknown:
            raise TypeError(
                f"{owner}: unexpected keyword arguments {sorted(unknown)}; "
                f"allowed besides p, num_subnets, subnets_per_step, seed: {sorted(_PASS_THROUGH)}"
            )
        config = _check_layer_args(owner, p, num_subnets, subnets_per_step, seed, kw)
        self.p = None if p is None else config.p
        self.num_subnets = num_subnets
        self.subnets_per_step = subnets_per_step
        self.seed = check_seed(owner, seed)
        self.kw = dict(kw)
        # The trainer decides the schedule unless the user fixed it.
        self.trainer_scheduled = kw.get("total_steps") is None and kw.get("steps_per_set") is None

    def as_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serializable), to rebuild the callback."""
        args: dict[str, Any] = {
            "p": self.p,
            "num_subnets": self.num_subnets,
            "subnets_per_step": self.subnets_per_step,
            "seed": self.seed,
        }
        for key, value in self.kw.items():
            args[key] = list(value) if isinstance(value, tuple) else value
        return args


def _check_layer_args(
    owner: str,
    p: float | None,
    num_subnets: int,
    subnets_per_step: int,
    seed: int,
    kw: Mapping[str, Any],
) -> GyroDropoutConfig:
    """Validate the layer options at construction (not when the trainer first applies
    them), through the config the layers are built from; returns it."""
    options = dict(kw)
    if options.get("total_steps") is None and options.get("steps_per_set") is None:
        options["steps_per_set"] = 1  # the trainer sets it later
    config = GyroDropoutConfig(
        p=0.5 if p is None else p,
        num_subnets=num_subnets,
        subnets_per_step=subnets_per_step,
        owner=owner,
        **options,
    )
    check_seed(owner, seed)
    return config


def stepped_modules(model: nn.Module) -> dict[str, SteppedModule]:
    """Every gyrodrop module of ``model`` (wrappers removed), by qualified name."""
    return {
        name: module
        for name, module in unwrap_model(model).named_modules()
        if isinstance(module, SteppedModule)
    }


def apply(model: nn.Module, options: GyroOptions) -> int:
    """Rewrite ``model``'s dropout layers for trainer-owned stepping; returns the number
    of layers replaced.

    Every gyrodrop module of the model (new or already there) gets ``auto_step=False``:
    the callback advances them once per optimizer step. The new layers get
    ``steps_per_set=1`` for now when the trainer is to decide it (see
    :func:`set_total_steps`). Calling it again replaces nothing and does not warn.
    """
    model = unwrap_model(model)
    before = {id(m) for m in model.modules()}
    had_gyro = bool(stepped_modules(model))
    if options.trainer_scheduled:
        schedule_kw: dict[str, Any] = {"steps_per_set": 1}  # provisional: set_total_steps
    else:
        schedule_kw = {
            k: options.kw[k]
            for k in ("total_steps", "steps_per_set")
            if options.kw.get(k) is not None
        }
    other_kw = {k: v for k, v in options.kw.items() if k not in ("total_steps", "steps_per_set")}
    with warnings.catch_warnings():
        if had_gyro:  # a second call, or a model the user rewrote: nothing to replace is fine
            warnings.filterwarnings("ignore", message="apply_gyro_dropout: no nn.Dropout")
        count = apply_gyro_dropout(
            model,
            p=options.p,
            num_subnets=options.num_subnets,
            subnets_per_step=options.subnets_per_step,
            seed=options.seed,
            auto_step=False,
            **schedule_kw,
            **other_kw,
        )
    set_stepping(model, "manual")  # the callback steps once per optimizer step
    for module in model.modules():
        if (
            options.trainer_scheduled
            and id(module) not in before
            and isinstance(module, ScheduledModule)
        ):
            module.schedule_by_trainer()
    return count


def set_total_steps(model: nn.Module, total_steps: float, owner: str) -> int:
    """Give the trainer-scheduled modules of ``model`` the run's number of optimizer
    steps (``steps_per_set = max(1, total_steps * tau // sigma)``); returns how many.

    An unknown or unbounded count (``inf``: training without a step or epoch limit)
    keeps ``steps_per_set=1`` and warns.
    """
    modules = [
        m
        for m in stepped_modules(model).values()
        if isinstance(m, ScheduledModule) and m.trainer_scheduled
    ]
    if not modules:
        return 0
    if total_steps is None or not math.isfinite(total_steps) or int(total_steps) < 1:
        warnings.warn(
            f"{owner}: the trainer's number of optimizer steps is {total_steps}; gyro "
            "subnetwork sets change every step (steps_per_set=1). Set max_steps or "
            "max_epochs, or pass total_steps= or steps_per_set= to the callback.",
            UserWarning,
            stacklevel=3,
        )
        return 0
    for module in modules:
        module.schedule_by_trainer(int(total_steps))
    return len(modules)


def advance(model: nn.Module, n: int = 1) -> None:
    """Advance every gyrodrop module of ``model`` by ``n`` steps."""
    step(unwrap_model(model), n)


def gyro_steps(model: nn.Module | None) -> dict[str, int]:
    """``{qualified name: step}`` of every gyrodrop module (empty without a model)."""
    if model is None:
        return {}
    return {name: m.current_step() for name, m in stepped_modules(model).items()}


def load_gyro_steps(model: nn.Module, steps: Mapping[str, int], owner: str) -> None:
    """Set the step of every gyrodrop module from ``steps`` (see :func:`gyro_steps`).

    Raises ``ValueError`` when the names differ: the model is not the one that was saved.
    """
    modules = stepped_modules(model)
    if set(steps) != set(modules):
        missing = sorted(set(steps) - set(modules))[:3]
        extra = sorted(set(modules) - set(steps))[:3]
        raise ValueError(
            f"{owner}: the saved gyro state does not match the model's gyrodrop modules "
            f"(saved but absent: {missing}, present but not saved: {extra}); "
            "hint: build the model and the callback exactly as in the run that was saved"
        )
    for name, module in modules.items():
        module.set_step(int(steps[name]))
