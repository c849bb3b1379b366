"""What every surgery module shares: the warning category of surgery's notices."""

from __future__ import annotations

from typing import Any

from gyrodrop.config import DropMode, LayerConfig

__all__ = ["SurgeryWarning", "check_timing"]


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
