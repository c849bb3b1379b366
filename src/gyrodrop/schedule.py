"""Which subnetworks are active at a step, and the stepped base module that owns it.

Consecutive scheduling (the paper's): the ``num_subnets`` (sigma) subnetworks form an
endless stream of seeded shuffles of ``range(sigma)``; set ``i`` is stream entries
``[i * tau, (i + 1) * tau)`` and is active for ``steps_per_set`` consecutive steps. Every
window ``[c * sigma, (c + 1) * sigma)`` of the stream is one shuffle, so every
subnetwork is used exactly once per cycle (sampling without replacement). Random
scheduling (the paper's ablation) draws ``tau`` distinct subnetworks afresh every step.
Replacement scheduling (what the authors' public code does) keeps each set for
``steps_per_set`` steps like consecutive scheduling, but draws its ``tau`` ids uniformly
*with* replacement, independently per set (a subnetwork may repeat in a set, or be
skipped for a whole run).

Everything is derived from ``(seed, step)``: no communication is needed to agree on the
active set across processes, and saving the ``step`` and ``seed`` buffers is enough to
resume the exact mask sequence.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gyrodrop import masks

__all__ = ["SubnetSchedule", "SteppedModule", "ScheduledModule", "step", "resolve_steps_per_set"]

SCHEDULES = ("consecutive", "random", "replacement")


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
        _check_int(owner, "steps_per_set", steps_per_set, 1)
        return int(steps_per_set)
    if total_steps is not None:
        _check_int(owner, "total_steps", total_steps, 1)
        return max(1, int(total_steps) * subnets_per_step // num_subnets)
    warnings.warn(
        f"{owner}: neither total_steps nor steps_per_set given; using steps_per_set=1. "
        "Pass total_steps (the number of optimizer steps of the run) so each subnetwork "
        "is trained for its share of the run.",
        UserWarning,
        stacklevel=4,
    )
    return 1


def _check_int(owner: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value}")


def check_p(owner: str, p: Any) -> float:
    """Validate a drop probability: a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"{owner}: p must be a float in [0, 1), got {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{owner}: p must be in [0, 1), got {p}")
    return float(p)


def check_seed(owner: str, seed: Any, name: str = "seed") -> int:
    """Validate a seed: an int in [0, 2**63)."""
    _check_int(owner, name, seed, 0, 2**63 - 1)
    return int(seed)


@dataclass(frozen=True)
class SubnetSchedule:
    """Maps a step to the active set of ``subnets_per_step`` subnetwork ids."""

    num_subnets: int
    subnets_per_step: int
    steps_per_set: int
    schedule: str = "consecutive"

    def set_index(self, step: int) -> int:
        """Index of the set active at ``step`` (changes only when the set changes)."""
        return step if self.schedule == "random" else step // self.steps_per_set

    def subnets(self, seed: int, set_index: int) -> Tensor:
        """Ids of the subnetworks in set ``set_index``, int64 on the CPU, shape (tau,)."""
        sigma, tau = self.num_subnets, self.subnets_per_step
        if self.schedule == "random":
            return masks.seeded_permutation(seed, masks.TAG_RANDOM_SET, set_index, sigma)[:tau]
        if self.schedule == "replacement":
            return masks.seeded_draws(seed, masks.TAG_REPLACE_SET, set_index, tau, sigma)
        first = set_index * tau
        c0, c1 = first // sigma, (first + tau - 1) // sigma
        stream = torch.cat(
            [masks.seeded_permutation(seed, masks.TAG_PERM, c, sigma) for c in range(c0, c1 + 1)]
        )
        offset = first - c0 * sigma
        return stream[offset : offset + tau]

    def at_step(self, seed: int, step: int) -> Tensor:
        """Ids of the subnetworks active at ``step``."""
        return self.subnets(seed, self.set_index(step))


_COUNTER_BUFFERS = ("step", "seed", "schedule_seed")


class SteppedModule(nn.Module):
    """Base of every gyrodrop module whose randomness follows a step counter.

    Holds the ``step`` and ``seed`` buffers (so ``state_dict`` resumes exactly) and the
    ``auto_step`` rule: with ``auto_step=True`` each training-mode forward advances the
    step by one; otherwise call :func:`gyrodrop.step` after each optimizer step.

    The buffers move with the module (to an accelerator too); host-side copies of their
    values avoid one device synchronization per layer per step. A copy is trusted only
    while the buffer is the same tensor at the same version: any in-place write
    (``load_state_dict``, :func:`gyrodrop.step`, a DDP buffer broadcast) bumps the
    version and the value is read again.
    """

    step: Tensor
    seed: Tensor

    def __init__(self, *, seed: int, auto_step: bool, owner: str) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seed", torch.tensor(check_seed(owner, seed), dtype=torch.int64))
        if not isinstance(auto_step, bool):
            raise ValueError(f"{owner}: auto_step must be a bool, got {auto_step!r}")
        self.auto_step = auto_step
        self._mirrors: dict[str, tuple[Tensor, int, int]] = {}

    def _host(self, name: str) -> int:
        """The value of the scalar buffer ``name`` as a Python int, cached on the host."""
        t: Tensor = getattr(self, name)
        try:
            version = t._version
        except RuntimeError:  # inference tensors track no version
            return int(t)
        cached = self._mirrors.get(name)
        if cached is not None and cached[0] is t and cached[1] == version:
            return cached[2]
        value = int(t)
        self._mirrors[name] = (t, version, value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) gets fresh tensors whose version restarts at 0:
        # cached host values must not travel with it.
        state = dict(self.__dict__)
        state["_mirrors"] = {}
        return state

    def advance(self, n: int = 1) -> None:
        """Advance the step counter by ``n`` (what :func:`gyrodrop.step` calls)."""
        value = self.current_step()
        self.step.add_(n)  # a buffer: never requires grad
        try:
            self._mirrors["step"] = (self.step, self.step._version, value + n)
        except RuntimeError:
            self._mirrors.pop("step", None)

    def current_step(self) -> int:
        """The step counter as a Python int."""
        return self._host("step")

    def current_seed(self) -> int:
        """The seed as a Python int."""
        return self._host("seed")

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # A checkpoint saved before surgery (plain nn.Dropout) has no step/seed, one from
        # before schedule seeds no schedule_seed: keep the module's own values.
        absent = [n for n in _COUNTER_BUFFERS if prefix + n not in state_dict]
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)


class ScheduledModule(SteppedModule):
    """A :class:`SteppedModule` that trains ``num_subnets`` subnetworks on a schedule.

    ``seed`` draws this layer's masks; ``schedule_seed`` (default: ``seed``) draws the
    order in which subnetwork ids become active. Layers sharing the schedule seed (and
    sigma, tau, ``steps_per_set``) activate the same ids at the same steps, so the
    model's subnetwork ``k`` is the tuple of every layer's mask ``k``: the paper's sigma
    network-level subnetworks. The surgery functions give every layer its own ``seed``
    and one shared ``schedule_seed``.
    """

    schedule_seed: Tensor

    def __init__(
        self,
        *,
        num_subnets: int,
        subnets_per_step: int,
        total_steps: int | None,
        steps_per_set: int | None,
        schedule: str,
        seed: int,
        auto_step: bool,
        owner: str,
        schedule_seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        schedule_seed = seed if schedule_seed is None else schedule_seed
        self.register_buffer(
            "schedule_seed",
            torch.tensor(check_seed(owner, schedule_seed, "schedule_seed"), dtype=torch.int64),
        )
        _check_int(owner, "num_subnets", num_subnets, 1)
        _check_int(owner, "subnets_per_step", subnets_per_step, 1, num_subnets)
        if schedule not in SCHEDULES:
            raise ValueError(f"{owner}: schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.num_subnets = num_subnets
        self.subnets_per_step = subnets_per_step
        self.total_steps = total_steps
        self.steps_per_set = resolve_steps_per_set(
            owner, num_subnets, subnets_per_step, total_steps, steps_per_set
        )
        self.schedule = schedule

    @property
    def subnet_schedule(self) -> SubnetSchedule:
        """The schedule object for the current hyperparameters."""
        return SubnetSchedule(
            self.num_subnets, self.subnets_per_step, self.steps_per_set, self.schedule
        )

    def active_subnets(self, step: int | None = None) -> Tensor:
        """Ids of the subnetworks active at ``step`` (default: the current step)."""
        step = self.current_step() if step is None else step
        return self.subnet_schedule.at_step(self.current_schedule_seed(), step)

    def current_schedule_seed(self) -> int:
        """The schedule seed as a Python int."""
        return self._host("schedule_seed")


def step(model: nn.Module, n: int = 1) -> None:
    """Advance every gyrodrop module in ``model`` by ``n`` steps.

    Call after each optimizer step when the modules were built with
    ``auto_step=False`` (gradient accumulation, several forwards per step).

    Args:
        model: any module; every gyrodrop module inside it (``GyroDropout``,
            ``BlockGyroLinear``, ``StochasticDepth``, ...) advances, nothing else changes.
        n: steps to advance, default 1.

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
    for module in model.modules():
        if isinstance(module, SteppedModule):
            module.advance(n)
