"""What every surgery module shares: the warning category of surgery's notices."""

from __future__ import annotations

__all__ = ["SurgeryWarning"]


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
