"""The base of every layer that trains ``num_subnets`` subnetworks on a schedule.

:class:`ScheduledModule` owns what the gyro layers (``GyroDropout``,
``BlockGyroLinear``, ``GyroDropBlock2d``) share: sigma, tau, ``steps_per_set`` and the
schedule (validated once), the active set at a step, the cache of whatever a layer
derives from the active set (rebuilt only when the set, a seed or a hyperparameter
changes), and the rows of the local batch each active subnetwork gets
(:meth:`ScheduledModule.group_counts`, over the global batch under DDP).
:class:`SubnetLayer` is the protocol the prediction and analysis code read one
subnetwork's mask through.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol, cast, runtime_checkable

import torch
from torch import Tensor

from gyrodrop import distributed
from gyrodrop._validation import check_seed
from gyrodrop.config import ScheduleConfig, resolve_steps_per_set
from gyrodrop.masks import SORTED_PERMUTATION_MAX
from gyrodrop.schedule import SubnetSchedule
from gyrodrop.stepping import TRAINER_SCHEDULED, SteppedModule

__all__ = ["ScheduledModule", "SubnetLayer"]


@runtime_checkable
class SubnetLayer(Protocol):
    """A layer that can give the mask of any one of its subnetworks (``GyroDropout``,
    ``BlockGyroLinear``, ``GyroDropBlock2d``): what subnetwork ensembles and the
    diversity analysis use.

    ``subnet_mask(k, like)`` returns the scaled mask of subnetwork ``k`` (an int in
    ``[0, num_subnets)``) in ``like``'s dtype and device, broadcastable against one
    row of the tensor it applies to; ``mask_side`` says which: the layer's ``"input"``
    or its ``"output"``.
    """

    num_subnets: int

    @property
    def mask_side(self) -> Literal["input", "output"]: ...

    def subnet_mask(self, k: int, like: Tensor) -> Tensor: ...


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
    # Class-level defaults: modules pickled before these caches existed lack them.
    _set_cache: tuple[Any, Any] | None = None
    _counts_cache: tuple[tuple[int, int, int, int], list[int]] | None = None

    config: ScheduleConfig
    num_subnets: int  # these four read config (gyrodrop.config.expose)
    subnets_per_step: int
    steps_per_set: int
    schedule: str

    def __init__(
        self,
        config: ScheduleConfig,
        *,
        seed: int,
        auto_step: bool,
        schedule_seed: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        owner = type(self).__name__
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        schedule_seed = seed if schedule_seed is None else schedule_seed
        self.register_counter("schedule_seed", check_seed(owner, schedule_seed, "schedule_seed"))
        self.config = config
        self.total_steps = total_steps

    @classmethod
    def from_config(
        cls, config: Any, *args: Any, total_steps: int | None = None, **kwargs: Any
    ) -> Any:
        """As :meth:`SteppedModule.from_config`; ``total_steps`` (the run's length that
        ``config.steps_per_set`` was derived from, not a setting) is kept as
        ``module.total_steps``."""
        module = super().from_config(config, *args, **kwargs)
        module.total_steps = total_steps
        return module

    @property
    def subnet_schedule(self) -> SubnetSchedule:
        """The schedule object for the current hyperparameters (built, and validated,
        once per change of them: this runs on every training forward)."""
        config = self.config
        cached = self.__dict__.get("_schedule_cache")
        if cached is not None and cached[0] is config:
            return cast(SubnetSchedule, cached[1])
        schedule = SubnetSchedule(
            config.num_subnets, config.subnets_per_step, config.steps_per_set, config.schedule
        )
        if not torch.compiler.is_compiling():  # traced: a cache would only add guards
            self.__dict__["_schedule_cache"] = (config, schedule)
        return schedule

    def active_subnets(self, step: int | None = None) -> Tensor:
        """Ids of the subnetworks active at ``step`` (default: the current step)."""
        step = self._step_arg(step, "active_subnets")
        return self.subnet_schedule.at_step(self.current_schedule_seed(), step)

    def active_subnets_tensor(self, step: Tensor) -> Tensor:
        """Ids of the subnetworks active at ``step`` (a 0-d int64 tensor), int64 on its
        device, shape ``(tau,)``: what the compiled training path computes in the graph
        (see :meth:`gyrodrop.schedule.SubnetSchedule.at_step_tensor`)."""
        return self.subnet_schedule.at_step_tensor(self.schedule_seed, step)

    def traces_schedule(self) -> bool:
        """Whether the compiled training path computes this layer's active set in the
        graph: ``True`` while being compiled, with ``num_subnets <= 2**20`` (the
        Feistel permutations of larger sigma keep the eager path, a graph break)."""
        return torch.compiler.is_compiling() and self.num_subnets <= SORTED_PERMUTATION_MAX

    def current_schedule_seed(self) -> int:
        """The schedule seed as a Python int."""
        return self._host("schedule_seed")

    @property
    def mask_side(self) -> Literal["input", "output"]:
        """Where this layer's masks apply: on its ``"input"`` (dropout layers) or its
        ``"output"`` (``BlockGyroLinear(prune="output")``)."""
        return "input"

    def for_active_set(
        self,
        step: int,
        like: Hashable,
        build: Callable[[int, Tensor], Any],
    ) -> Any:
        """What this layer derives from the set active at ``step``, built once per set.

        ``build(seed, active_ids)`` gets the mask seed and the ids of the active
        subnetworks (int64 on the CPU, shape ``(tau,)``) and returns the masks (or any
        value) the forward needs. The result is kept until the active set, either seed,
        the ``config`` or ``like`` (what the value depends on in the
        input: shape, dtype, device) changes. Derived state: never saved nor pickled.
        """
        schedule = self.subnet_schedule
        set_index = schedule.set_index(step)
        seed, schedule_seed = self.current_seed(), self.current_schedule_seed()
        key = (set_index, seed, schedule_seed, like, self.config)
        cached = self._set_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        value = build(seed, schedule.subnets(schedule_seed, set_index))
        self._set_cache = (key, value)
        return value

    def group_counts(self, batch: int) -> list[int]:
        """Rows of a local batch of ``batch`` samples that each active subnetwork gets,
        in order (``len == subnets_per_step``; zeros where the batch is short): the
        local share of the global batch's ``subnets_per_step`` contiguous groups (see
        :func:`gyrodrop.distributed.row_window`)."""
        start, global_batch = distributed.row_window(batch)
        if torch.compiler.is_compiling():  # traced once: a cache would only add guards
            return distributed.local_group_counts(
                start, batch, global_batch, self.config.subnets_per_step
            )
        key = (start, batch, global_batch, self.config.subnets_per_step)
        cached = self._counts_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        counts = distributed.local_group_counts(
            start, batch, global_batch, self.config.subnets_per_step
        )
        self._counts_cache = (key, counts)
        return counts

    @property
    def trainer_scheduled(self) -> bool:
        """Whether a trainer callback sets this layer's schedule length
        (:meth:`schedule_by_trainer`)."""
        return bool(getattr(self, TRAINER_SCHEDULED, False))

    def schedule_by_trainer(self, total_steps: int | None = None) -> None:
        """Let a trainer callback set this layer's schedule length (what
        :mod:`gyrodrop.integrations` calls): loading a checkpoint then no longer
        compares ``steps_per_set``, and, given ``total_steps`` (an int >= 1, the run's
        optimizer steps), ``steps_per_set`` becomes ``max(1, total_steps * tau //
        sigma)``."""
        setattr(self, TRAINER_SCHEDULED, True)
        if total_steps is not None:
            owner = type(self).__name__
            steps = resolve_steps_per_set(
                owner, self.num_subnets, self.subnets_per_step, total_steps, None
            )
            self.config = self.config.replace(owner=owner, steps_per_set=steps)
            self.total_steps = total_steps

    def __getstate__(self) -> dict[str, Any]:
        # Caches of derived tensors do not travel with copies (deepcopy, pickle).
        state = super().__getstate__()
        state["_set_cache"] = None
        state["_counts_cache"] = None
        return state
