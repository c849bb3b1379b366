"""One frozen, self-validating config per method: where each hyperparameter is named,
checked, saved, shown and compared.

A config holds the settings that shape a layer's masks (nanoGPT's ``GPTConfig`` is the
model: a frozen dataclass the model reads and nothing else restates). It is checked
once, when it is built, with the argument names the user passed and one message
format (``"<owner>: <name> must be <allowed>, got <value>"``, :mod:`gyrodrop._validation`);
every field comes back normalized (``int``, ``float``, ``bool``, the chosen string, a
tuple). Everything else is derived from the fields:

- the module's ``hparams()`` and saved settings (``_extra_state``): :meth:`LayerConfig.hparams`;
- its ``extra_repr()``: :meth:`LayerConfig.describe`;
- the key of its active-set cache: the config itself (frozen, hence hashable);
- the checkpoint check: every field is compared, a difference warns naming it;
- attributes of the module (``layer.p`` is ``layer.config.p``; assigning
  ``layer.p = 0.3`` builds a new, checked config): :func:`config_properties`.

So a new hyperparameter is one field here (with its check) plus the code that uses
it. Configs are passed to the functional forms' private cores as is: the per-forward
path never validates again.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

from gyrodrop._validation import check_bool, check_choice, check_int, check_p

__all__ = [
    "LayerConfig",
    "ScheduleConfig",
    "GyroDropoutConfig",
    "BlockGyroConfig",
    "DropBlockConfig",
    "GyroDropBlockConfig",
    "StochasticDepthConfig",
    "config_properties",
    "warmup_rate",
    "Schedule",
    "SCHEDULES",
    "Scale",
    "SCALES",
    "Prune",
    "PRUNE_MODES",
    "Mode",
    "MODES",
    "KeptRows",
    "KEPT_ROWS",
    "MAX_SUBNETS",
    "DropMode",
    "DROP_MODES",
    "resolve_steps_per_set",
    "check_schedule",
]

#: How the active sets follow each other: the paper's ``consecutive``; ``random``, its
#: ablation; ``replacement``, the authors' code (ids drawn with replacement per set).
Schedule = Literal["consecutive", "random", "replacement"]
SCHEDULES: tuple[Schedule, ...] = ("consecutive", "random", "replacement")
#: How kept values are scaled: ``1/(1-p)`` (inverted) or by the realized keep rate.
Scale = Literal["inverted", "realized"]
SCALES: tuple[Scale, ...] = ("inverted", "realized")
#: Which side of the weight a dropped block removes (input columns or output rows).
Prune = Literal["input", "output"]
PRUNE_MODES: tuple[Prune, ...] = ("input", "output")
#: What one stochastic-depth decision drops: the whole batch's branch or one sample's.
Mode = Literal["block", "sample"]
MODES: tuple[Mode, ...] = ("block", "sample")
#: Sample-mode stochastic depth: each row kept alone, or a fixed number per step.
KeptRows = Literal["random", "fixed"]
KEPT_ROWS: tuple[KeptRows, ...] = ("random", "fixed")

#: When a layer drops (Liu et al., ICML 2023, "Dropout Reduces Underfitting"): all
#: run long (``standard``), only before the cutoff step (``early``: fights underfitting)
#: or only from it on (``late``: regularizes the end of training).
DropMode = Literal["standard", "early", "late"]
DROP_MODES: tuple[DropMode, ...] = ("standard", "early", "late")

#: The largest ``num_subnets`` (sigma): subnetwork ids and the schedule's bijection
#: work on 62-bit integers.
MAX_SUBNETS = 2**62

#: A field's check: ``(owner, name the user passed, value) -> normalized value``.
Check = Callable[[str, str, Any], Any]


def setting(default: Any, check: Check) -> Any:
    """A config field: its default and its check (run once, at construction)."""
    return field(default=default, metadata={"check": check})


def _prob(owner: str, name: str, value: Any) -> float:
    return check_p(owner, value, name)


def _at_least(low: int) -> Check:
    return lambda owner, name, value: check_int(owner, name, value, low)


def _optional_at_least(low: int) -> Check:
    return lambda o, n, v: None if v is None else check_int(o, n, v, low)


def _none_or_at_least(low: int) -> Check:
    def check(owner: str, name: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}: {name} must be None or an int >= {low}, got {value!r}")
        return int(value)

    return check


def _choice(choices: Sequence[str]) -> Check:
    return lambda owner, name, value: check_choice(owner, name, value, choices)


def _dims(owner: str, name: str, dims: Any) -> tuple[int, ...] | None:
    if dims is None:
        return None
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"{owner}: {name} must be None, an int or a tuple of ints, got {dims!r}")
    dims = tuple(dims)
    if 0 in dims:
        raise ValueError(
            f"{owner}: {name} must name non-batch dims (1..ndim-1 or negative), got {dims}; "
            "dim 0 is the batch"
        )
    if len(set(dims)) != len(dims):
        raise ValueError(f"{owner}: {name} must not repeat a dim, got {dims}")
    return dims


def _fraction(owner: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{owner}: {name} must be a float in (0, 1) (a fraction of total_steps), got {value!r}"
        )
    if not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"{owner}: {name} must be in (0, 1) (a fraction of total_steps), got {value}"
        )
    return float(value)


def _sigma(owner: str, name: str, value: Any) -> int:
    check_int(owner, name, value, 1)
    if value > MAX_SUBNETS:
        raise ValueError(f"{owner}: {name} must be <= 2**62, got {value}")
    return int(value)


_C = TypeVar("_C", bound="LayerConfig")


@dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """Base of the configs: checks every field once, at construction.

    ``owner`` (the layer or function the user called) and ``names`` (the user's name
    of a field where it differs, ``{"p": "drop_rate"}``) only shape error messages;
    they are not fields. Subclasses declare fields with :func:`setting` and add the
    checks that span several fields in :meth:`_check_together`.

    Every layer's config has the three fields of early and late dropout (Liu et al.,
    ICML 2023, "Dropout Reduces Underfitting"): ``drop_mode`` (``"standard"``,
    ``"early"`` or ``"late"``), ``drop_cutoff`` (the cutoff as a fraction of the
    ``total_steps`` passed at construction, in ``(0, 1)``) and ``cutoff_step`` (the
    step, derived as ``max(1, round(drop_cutoff * total_steps))`` or given). The
    standard mode takes neither; early and late need one. :meth:`drops_at` says
    whether the layer drops at a step; ``describe`` shows them only when not standard.
    """

    #: The owner named in messages when none is given: the method's module.
    layer: ClassVar[str] = "gyrodrop"

    owner: InitVar[str | None] = None
    names: InitVar[Mapping[str, str] | None] = None
    #: The run's optimizer steps: ``cutoff_step = round(drop_cutoff * total_steps)``
    #: (and, in :class:`ScheduleConfig`, ``steps_per_set``); not a field.
    total_steps: InitVar[int | None] = None

    # When the layer drops, every stepped layer alike (see :meth:`drops_at`).
    drop_mode: DropMode = setting("standard", _choice(DROP_MODES))
    drop_cutoff: float | None = setting(None, _fraction)
    cutoff_step: int | None = setting(None, _optional_at_least(1))

    def __post_init__(
        self,
        owner: str | None,
        names: Mapping[str, str] | None,
        total_steps: int | None = None,
    ) -> None:
        owner = owner or self.layer
        renamed = dict(names or {})
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                value = check(owner, renamed.get(f.name, f.name), getattr(self, f.name))
                object.__setattr__(self, f.name, value)
        self._resolve_cutoff(owner, renamed, total_steps)
        self._check_together(owner, renamed)

    def _resolve_cutoff(self, owner: str, names: dict[str, str], total_steps: Any) -> None:
        """``cutoff_step`` from ``drop_cutoff`` and ``total_steps`` (or as given), and
        the options that go together: a cutoff only with ``early``/``late``, one of
        them required there."""
        cutoff, name = self.drop_cutoff, names.get("drop_cutoff", "drop_cutoff")
        if self.drop_mode == "standard":
            given = [n for n in ("drop_cutoff", "cutoff_step") if getattr(self, n) is not None]
            if given:
                user = names.get(given[0], given[0])
                raise ValueError(
                    f"{owner}: {user} applies to drop_mode='early' or 'late' (dropout before "
                    f"or after the cutoff), got {user}={getattr(self, given[0])} with "
                    "drop_mode='standard'"
                )
            return
        if cutoff is None and self.cutoff_step is None:
            raise ValueError(
                f"{owner}: drop_mode={self.drop_mode!r} needs {name} (the fraction of "
                "total_steps at which dropout stops (early) or starts (late)), got None"
            )
        if cutoff is None:
            return  # cutoff_step given as is
        if total_steps is None:
            if self.cutoff_step is None:
                raise ValueError(
                    f"{owner}: {name}={cutoff} is a fraction of total_steps; pass total_steps "
                    "(the optimizer steps of the run), got None"
                )
            return  # a saved config: drop_cutoff and the cutoff_step it gave
        steps = check_int(owner, names.get("total_steps", "total_steps"), total_steps, 1)
        derived = max(1, round(cutoff * steps))
        if self.cutoff_step is not None and self.cutoff_step != derived:
            raise ValueError(
                f"{owner}: cutoff_step={self.cutoff_step} differs from {name} * total_steps "
                f"= {cutoff} * {steps} -> {derived}; pass one of them"
            )
        object.__setattr__(self, "cutoff_step", derived)

    def drops_at(self, step: Any) -> Any:
        """Does the layer drop at ``step``? Always in the ``standard`` mode; before
        ``cutoff_step`` (``step < cutoff_step``) in the ``early`` mode; from it on in the
        ``late`` mode. ``step`` is an int (a ``bool`` back) or an integer tensor (a bool
        tensor back: a comparison, no host synchronization, so a compiled forward can
        select with ``torch.where``)."""
        if self.drop_mode == "standard":
            return True
        if self.drop_mode == "early":
            return step < self.cutoff_step
        return step >= self.cutoff_step

    def _check_together(self, owner: str, names: dict[str, str]) -> None:
        """Checks that span several fields (none here)."""

    def replace(self: _C, owner: str | None = None, **changes: Any) -> _C:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, owner=owner, **changes)

    def hparams(self) -> dict[str, Any]:
        """Every field in JSON types (tuples as lists): what the layer saves in its
        state (``_extra_state``) and compares when a checkpoint is loaded."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }

    def describe(self) -> str:
        """``"p=0.5, num_subnets=256, ..."``: every field for ``extra_repr``, ``p``
        first (fields that are ``None`` are left out)."""
        parts = []
        timing = ("drop_mode", "drop_cutoff", "cutoff_step")  # last; left out when standard
        for f in sorted(fields(self), key=lambda f: (f.name != "p", f.name in timing)):
            value = getattr(self, f.name)
            if value is not None and not (f.name in timing and self.drop_mode == "standard"):
                parts.append(f"{f.name}={value}")
        return ", ".join(parts)


def warmup_rate(p: float, warmup_steps: int, step: int) -> float:
    """The drop rate at ``step``: ``p``, ramped linearly from 0 at step 0 to ``p`` at
    step ``warmup_steps`` (0: no ramp). What the layers with ``warmup_steps`` use."""
    if warmup_steps and step < warmup_steps:
        return p * max(step, 0) / warmup_steps
    return p


def config_properties(config_class: type[LayerConfig]) -> dict[str, property]:
    """A property per field of ``config_class``, read from (and, when assigned, rebuilt
    into) the owner's ``config``: what a module class gets for its ``config_class``
    (:class:`gyrodrop.stepping.SteppedModule`), so ``layer.p`` reads ``layer.config.p``
    and ``layer.p = 0.3`` is checked as at construction."""
    return {f.name: _config_property(f.name) for f in fields(config_class)}


def _config_property(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.config, name)

    def set_(self: Any, value: Any) -> None:
        self.config = self.config.replace(owner=type(self).__name__, **{name: value})

    return property(get, set_, doc=f"``config.{name}``")


# --------------------------------------------------------------------------------------
# The gyro schedule (sigma, tau, steps_per_set, schedule), shared by the gyro layers.


def resolve_steps_per_set(
    owner: str,
    num_subnets: int,
    subnets_per_step: int,
    total_steps: int | None,
    steps_per_set: int | None,
) -> int:
    """``steps_per_set`` from the user's choice: given, derived from ``total_steps`` as
    ``max(1, total_steps * tau // sigma)``, or 1 with a warning when neither is given."""
    if total_steps is not None and steps_per_set is not None:
        raise ValueError(
            f"{owner}: pass at most one of total_steps and steps_per_set, got "
            f"total_steps={total_steps} and steps_per_set={steps_per_set}"
        )
    if steps_per_set is not None:
        check_int(owner, "steps_per_set", steps_per_set, 1)
        return int(steps_per_set)
    if total_steps is not None:
        check_int(owner, "total_steps", total_steps, 1)
        return max(1, int(total_steps) * subnets_per_step // num_subnets)
    warnings.warn(
        f"{owner}: neither total_steps nor steps_per_set given; using steps_per_set=1. "
        "Pass total_steps (the number of optimizer steps of the run) so each subnetwork "
        "is trained for its share of the run.",
        UserWarning,
        stacklevel=_outside_gyrodrop(),
    )
    return 1


def check_schedule(owner: str, num_subnets: Any, subnets_per_step: Any, schedule: Any) -> None:
    """Validate sigma (``num_subnets`` in ``[1, 2**62]``), tau (``subnets_per_step`` in
    ``[1, num_subnets]``) and the schedule name."""
    _sigma(owner, "num_subnets", num_subnets)
    check_int(owner, "subnets_per_step", subnets_per_step, 1, num_subnets)
    check_choice(owner, "schedule", schedule, SCHEDULES)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(LayerConfig):
    """Sigma, tau, ``steps_per_set`` and the schedule of a gyro layer.

    ``steps_per_set`` (an int ``>= 1``) is given, or derived from ``total_steps`` (not a
    field: ``max(1, total_steps * tau // sigma)``), or 1 with a warning when neither is
    given; at most one of them.
    """

    num_subnets: int = setting(256, _sigma)
    subnets_per_step: int = field(default=16)  # checked against num_subnets below
    steps_per_set: int = setting(None, _optional_at_least(1))  # None: derived below
    schedule: Schedule = setting("consecutive", _choice(SCHEDULES))

    def __post_init__(
        self,
        owner: str | None,
        names: Mapping[str, str] | None,
        total_steps: int | None = None,
    ) -> None:
        owner = owner or self.layer
        if total_steps is not None:
            check_int(owner, dict(names or {}).get("total_steps", "total_steps"), total_steps, 1)
        super().__post_init__(owner, names, total_steps)
        tau = dict(names or {}).get("subnets_per_step", "subnets_per_step")
        check_int(owner, tau, self.subnets_per_step, 1, self.num_subnets)
        steps = resolve_steps_per_set(
            owner,
            self.num_subnets,
            self.subnets_per_step,
            total_steps,
            self.steps_per_set,
        )
        object.__setattr__(self, "steps_per_set", steps)


def _outside_gyrodrop() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame
    outside gyrodrop and ``dataclasses``: warnings point at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_globals.get("__name__", "").split(".")[0] in ("gyrodrop", "dataclasses")
        or isinstance(frame.f_locals.get("self"), LayerConfig)  # a dataclass __init__
    ):
        frame, level = frame.f_back, level + 1
    return level


# --------------------------------------------------------------------------------------
# One config per method.


@dataclass(frozen=True, kw_only=True)
class GyroDropoutConfig(ScheduleConfig):
    """:class:`gyrodrop.GyroDropout` / :func:`gyrodrop.gyro.gyro_dropout`: ``p`` in
    ``[0, 1)``, the schedule, ``scale``, the ``dims`` the mask spans and
    ``unbatched_ndim`` (see the layer for each)."""

    layer: ClassVar[str] = "GyroDropout"

    p: float = setting(0.5, _prob)
    scale: Scale = setting("inverted", _choice(SCALES))
    dims: tuple[int, ...] | None = setting(None, _dims)
    unbatched_ndim: int | None = setting(None, _none_or_at_least(1))


@dataclass(frozen=True, kw_only=True)
class BlockGyroConfig(ScheduleConfig):
    """:class:`gyrodrop.BlockGyroLinear`: ``p`` in ``[0, 1)``, the schedule,
    ``block_size >= 1`` and the pruned side ``prune``."""

    layer: ClassVar[str] = "BlockGyroLinear"

    subnets_per_step: int = field(default=2)
    p: float = setting(0.5, _prob)
    block_size: int = setting(32, _at_least(1))
    prune: Prune = setting("input", _choice(PRUNE_MODES))


@dataclass(frozen=True, kw_only=True)
class DropBlockConfig(LayerConfig):
    """:class:`gyrodrop.DropBlock2d` / :func:`gyrodrop.dropblock.dropblock2d`."""

    layer: ClassVar[str] = "DropBlock2d"

    p: float = setting(0.1, _prob)
    block_size: int = setting(7, _at_least(1))
    shared_channels: bool = setting(False, check_bool)
    scale: Scale = setting("inverted", _choice(SCALES))
    warmup_steps: int = setting(0, _at_least(0))


@dataclass(frozen=True, kw_only=True)
class GyroDropBlockConfig(ScheduleConfig):
    """:class:`gyrodrop.GyroDropBlock2d` / :func:`gyrodrop.dropblock.gyro_dropblock2d`."""

    layer: ClassVar[str] = "GyroDropBlock2d"

    num_subnets: int = setting(64, _sigma)
    subnets_per_step: int = field(default=4)
    p: float = setting(0.1, _prob)
    block_size: int = setting(7, _at_least(1))
    shared_channels: bool = setting(False, check_bool)
    scale: Scale = setting("inverted", _choice(SCALES))


@dataclass(frozen=True, kw_only=True)
class StochasticDepthConfig(LayerConfig):
    """:class:`gyrodrop.StochasticDepth` / :func:`gyrodrop.stochastic_depth.stochastic_depth`:
    ``p`` in ``[0, 1)`` (no default), ``mode``, ``warmup_steps``, ``per_rank`` and
    ``kept_rows`` (sample mode: ``"random"`` or ``"fixed"`` rows per step)."""

    layer: ClassVar[str] = "StochasticDepth"

    p: float = setting(dataclasses.MISSING, _prob)
    mode: Mode = setting("block", _choice(MODES))
    warmup_steps: int = setting(0, _at_least(0))
    per_rank: bool = setting(False, check_bool)
    kept_rows: KeptRows = setting("random", _choice(KEPT_ROWS))
