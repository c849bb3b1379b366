"""What every surgery function shares: the warning category of surgery's notices and
the skeleton each ``apply_*`` runs (walk the model, ask the method's policy for each
matching module, swap all or nothing, attach the model-level stepper, warn when nothing
matched). Each ``apply_*`` keeps only its policy and its site rules."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from gyrodrop._modules import Policy, replace_modules
from gyrodrop.config import DropMode, LayerConfig
from gyrodrop.schedule import attach_stepper

__all__ = ["SurgeryWarning", "rewrite", "one_schedule_warning", "check_timing"]


def check_timing(
    owner: str, drop_mode: DropMode, drop_cutoff: float | None, total_steps: int | None
) -> dict[str, Any]:
    """``drop_mode`` and ``drop_cutoff`` checked as every layer will check them (one
    :class:`~gyrodrop.config.LayerConfig`), refused naming ``owner``; the keywords to
    give each layer (none in the standard mode)."""
    LayerConfig(drop_mode=drop_mode, drop_cutoff=drop_cutoff, total_steps=total_steps, owner=owner)
    return {} if drop_mode == "standard" else {"drop_mode": drop_mode, "drop_cutoff": drop_cutoff}


class SurgeryWarning(UserWarning):
    """Notices of the surgery functions (``apply_*``, ``remove_*``, the site and block
    finders): nothing matched, modules left alone and why, settings derived for the
    user. A ``UserWarning``, so it shows by default; filter it by category.

    Example:
        >>> import warnings, torch, gyrodrop
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no dropout to replace
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", gyrodrop.SurgeryWarning)
        ...     try:
        ...         gyrodrop.apply_gyro_dropout(model, total_steps=100)
        ...     except gyrodrop.SurgeryWarning as notice:
        ...         print(str(notice).split(";")[0])
        apply_gyro_dropout: no nn.Dropout / Dropout1d/2d/3d layer found
    """


def rewrite(owner: str, model: nn.Module, policy: Policy, *, auto_step: bool, nothing: str) -> int:
    """The surgery skeleton: replace every module of ``model`` whose exact type is in
    ``policy`` (all or nothing: :func:`gyrodrop._modules.replace_modules`), give the
    model its stepper when ``auto_step`` and something was replaced, and warn
    ``"{owner}: {nothing}"`` (a :class:`SurgeryWarning`) when nothing was. Returns the
    count."""
    count = replace_modules(model, policy) if policy else 0
    if count and auto_step:
        attach_stepper(model)  # one step per training forward of the model
    if count == 0:
        warnings.warn(f"{owner}: {nothing}", SurgeryWarning, stacklevel=3)
    return count


@contextlib.contextmanager
def one_schedule_warning(
    owner: str, total_steps: int | None, steps_per_set: int | None
) -> Iterator[None]:
    """Within: one :class:`SurgeryWarning` for the whole model when neither
    ``total_steps`` nor ``steps_per_set`` is given, instead of one per layer."""
    with warnings.catch_warnings():
        if total_steps is None and steps_per_set is None:
            warnings.warn(
                f"{owner}: neither total_steps nor steps_per_set given; using steps_per_set=1",
                SurgeryWarning,
                stacklevel=4,
            )
            warnings.filterwarnings("ignore", message=".*neither total_steps nor steps_per_set")
        yield
