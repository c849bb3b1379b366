"""Argument checks shared by every gyrodrop module and function (the bottom layer).

One message format everywhere, so a user reads every refusal the same way::

    "<owner>: <name> must be <what is allowed>, got <value>[; hint: <fix>]"

``owner`` names the layer or function the user called (``"GyroDropout"``,
``"apply_block_gyro"``). Modules check in ``__init__`` and the functional forms check
the same way with the same helpers (as ``nn.Dropout`` and ``F.dropout`` do), so an
argument is refused identically whichever form the user picked. Every check raises
``ValueError`` and returns the value normalized (``int``, ``float``, ``bool`` or the
chosen string), so callers write ``p = check_p(owner, p)``.

Nothing here imports torch or another gyrodrop module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "MAX_SEED",
    "MAX_STEP",
    "check_step_count",
    "check_int",
    "check_p",
    "check_seed",
    "check_bool",
    "check_choice",
]

#: Seeds are int64 buffers: ``[0, 2**63 - 1]``.
MAX_SEED = 2**63 - 1

_S = TypeVar("_S", bound=str)


def _hint(hint: str | None) -> str:
    return f"; hint: {hint}" if hint else ""


#: The largest step count or step advance a layer takes: its ``step`` buffer is int64, and
#: a step and an advance must add up without overflowing.
MAX_STEP = 2**62


def check_step_count(owner: str, name: str, value: Any) -> int:
    """A step or a number of steps: an ``int`` in ``[0, 2**62]`` (the counter is int64).

    Raises:
        ValueError: e.g. ``"gyrodrop.step: n must be >= 0, got -5"`` or
            ``"gyrodrop.step: n must be <= 2**62 (the step counter is int64), got ..."``.
    """
    check_int(owner, name, value, 0)
    if value > MAX_STEP:
        raise ValueError(
            f"{owner}: {name} must be <= 2**62 (the step counter is int64), got {value}"
        )
    return int(value)


def check_int(
    owner: str,
    name: str,
    value: Any,
    low: int,
    high: int | None = None,
    *,
    hint: str | None = None,
) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (``high=None``: no upper bound).

    Raises:
        ValueError: ``value`` is not an ``int`` (``bool`` is refused) or out of range,
            e.g. ``"GyroDropout: num_subnets must be >= 1, got 0"``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {value!r}{_hint(hint)}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value}{_hint(hint)}")
    return int(value)


def check_p(owner: str, p: Any, name: str = "p") -> float:
    """A drop probability: a real number in ``[0, 1)`` (1 would divide by zero in the
    ``1/(1-p)`` scale), returned as ``float``.

    Raises:
        ValueError: e.g. ``"GyroDropout: p must be in [0, 1), got 1.5"``.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"{owner}: {name} must be a float in [0, 1), got {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {p}")
    return float(p)


def check_seed(owner: str, seed: Any, name: str = "seed") -> int:
    """A seed: an ``int`` in ``[0, 2**63 - 1]`` (it is stored in an int64 buffer)."""
    return check_int(owner, name, seed, 0, MAX_SEED)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """A flag: exactly ``True`` or ``False`` (``0``/``1`` and strings are refused,
    so a swapped positional argument cannot pass silently)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {value!r}")
    return value


def check_choice(
    owner: str, name: str, value: Any, choices: Sequence[_S], *, hint: str | None = None
) -> _S:
    """One of ``choices`` (the arguments of a ``Literal`` type, so mypy checks the
    callers and this checks everyone else).

    Raises:
        ValueError: e.g. ``"GyroDropout: schedule must be one of ('consecutive',
            'random'), got 'cyclic'"``.
    """
    for choice in choices:
        if isinstance(value, str) and value == choice:
            return choice
    raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}{_hint(hint)}")
