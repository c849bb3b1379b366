"""Which subnetworks are active at a step: the schedule rule (pure functions of
``(schedule_seed, step)``).

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

Who advances the step lives in :mod:`gyrodrop.stepping` (re-exported here, its names
keep their old import path); the base of the scheduled layers in
:mod:`gyrodrop.scheduled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gyrodrop import masks
from gyrodrop._validation import check_int
from gyrodrop.config import (
    MAX_SUBNETS,
    SCHEDULES,
    Schedule,
    check_schedule,
    resolve_steps_per_set,
)
from gyrodrop.stepping import (
    TRAINER_SCHEDULED,
    SteppedModule,
    attach_stepper,
    bind_to_optimizer,
    check_input,
    in_backward,
    set_stepping,
    step,
)

__all__ = [
    "SubnetSchedule",
    "Schedule",
    "SCHEDULES",
    "resolve_steps_per_set",
    "check_schedule",
    "MAX_SUBNETS",
    # re-exported from gyrodrop.stepping (their old import path)
    "SteppedModule",
    "step",
    "set_stepping",
    "bind_to_optimizer",
    "attach_stepper",
    "check_input",
    "in_backward",
    "TRAINER_SCHEDULED",
]


@dataclass(frozen=True)
class SubnetSchedule:
    """Maps a step to the active set of ``subnets_per_step`` subnetwork ids."""

    num_subnets: int
    subnets_per_step: int
    steps_per_set: int
    schedule: Schedule = "consecutive"

    def __post_init__(self) -> None:
        check_schedule("SubnetSchedule", self.num_subnets, self.subnets_per_step, self.schedule)
        check_int("SubnetSchedule", "steps_per_set", self.steps_per_set, 1)

    def set_index(self, step: int) -> int:
        """Index of the set active at ``step`` (changes only when the set changes)."""
        return step if self.schedule == "random" else step // self.steps_per_set

    def subnets(self, seed: int, set_index: int) -> Tensor:
        """Ids of the subnetworks in set ``set_index``, int64 on the CPU, shape (tau,).

        Each cycle (and each random set) is a seeded permutation of ``range(sigma)``:
        for ``sigma <= masks.SORTED_PERMUTATION_MAX`` (2**20) the permutation of 0.1.0
        (sorted by hash, O(sigma log sigma) per set change, the same ids as before);
        above it a keyed Feistel bijection (:func:`gyrodrop.masks.feistel_permutation`)
        evaluated at the tau positions only, O(tau) per set change.
        """
        sigma, tau = self.num_subnets, self.subnets_per_step
        if sigma > masks.SORTED_PERMUTATION_MAX:
            return self._subnets_bijective(seed, set_index)
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

    def _subnets_bijective(self, seed: int, set_index: int) -> Tensor:
        sigma, tau = self.num_subnets, self.subnets_per_step
        positions = torch.arange(tau, dtype=torch.int64)
        if self.schedule == "random":
            return masks.feistel_permutation(
                seed, masks.TAG_RANDOM_SET, set_index, sigma, positions
            )
        first = set_index * tau
        c0, c1 = first // sigma, (first + tau - 1) // sigma
        pieces = []
        for c in range(c0, c1 + 1):
            lo, hi = max(first, c * sigma), min(first + tau, (c + 1) * sigma)
            index = torch.arange(lo - c * sigma, hi - c * sigma, dtype=torch.int64)
            pieces.append(masks.feistel_permutation(seed, masks.TAG_PERM, c, sigma, index))
        return torch.cat(pieces)

    def at_step(self, seed: int, step: int) -> Tensor:
        """Ids of the subnetworks active at ``step``."""
        return self.subnets(seed, self.set_index(step))

    def at_step_tensor(self, seed: Tensor, step: Tensor) -> Tensor:
        """:meth:`at_step` with the schedule seed and the step as 0-d int64 tensors: the
        same ids, int64 on ``step``'s device, shape ``(tau,)``, computed with tensor ops
        of static shapes only (no ``.item()``, no Python branch on the step), so that
        ``torch.compile`` traces it once for every step. Consecutive scheduling computes
        the two cycles a set can straddle (two sorts of sigma hashes per call).

        Raises:
            ValueError: ``num_subnets > masks.SORTED_PERMUTATION_MAX`` (the Feistel
                permutations walk cycles a data-dependent number of times).
        """
        sigma, tau = self.num_subnets, self.subnets_per_step
        if sigma > masks.SORTED_PERMUTATION_MAX:
            raise ValueError(
                f"SubnetSchedule: the step-tensor schedule needs num_subnets <= 2**20, got "
                f"{sigma}; larger sigma use the eager schedule (at_step)"
            )
        device = step.device
        seed = seed.to(device)
        if self.schedule == "random":
            perm = masks.seeded_permutation(seed, masks.TAG_RANDOM_SET, step, sigma, device)
            return perm[:tau]
        set_index = step // self.steps_per_set
        if self.schedule == "replacement":
            return masks.seeded_draws(seed, masks.TAG_REPLACE_SET, set_index, tau, sigma, device)
        first = set_index * tau
        c0 = first // sigma
        cycles = torch.stack([c0, c0 + 1])  # a set of tau <= sigma ids spans two at most
        stream = masks.seeded_permutation(seed, masks.TAG_PERM, cycles, sigma, device)
        offset = first - c0 * sigma
        return stream.reshape(-1)[offset + torch.arange(tau, device=device)]
