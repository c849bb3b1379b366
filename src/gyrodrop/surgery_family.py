"""Old import path of :func:`~gyrodrop.surgery.apply_dropblock` and
:func:`~gyrodrop.surgery.remove_gyro_dropout` (now in :mod:`gyrodrop.surgery`)."""

from gyrodrop.surgery.dropblock import apply_dropblock
from gyrodrop.surgery.gyro import remove_gyro_dropout

__all__ = ["apply_dropblock", "remove_gyro_dropout"]
