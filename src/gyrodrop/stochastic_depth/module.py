"""The stochastic-depth decision and its module: :func:`stochastic_depth` (a pure
function of ``(seed, step)`` and the input) and :class:`StochasticDepth` (the module
that keeps ``p``, the mode and the step). See :mod:`gyrodrop.stochastic_depth`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gyrodrop import distributed, masks
from gyrodrop._validation import check_bool, check_int, check_seed
from gyrodrop.config import MODES, DropMode, Mode, StochasticDepthConfig
from gyrodrop.stepping import SteppedModule, check_input, warmup_rate

__all__ = [
    "Mode",
    "MODES",
    "block_keep",
    "stochastic_depth",
    "StochasticDepth",
    "MCDraws",
    "MCLayoutError",
]

# Sub-streams of masks.TAG_DEPTH.
_STREAM_BLOCK = 1
_STREAM_SAMPLE = 2
_STREAM_MC = 3
_STREAM_RANK = 4
_SAMPLE_SALT = 0x5A5A5A5A  # Monte-Carlo sample-mode keys apart from block-mode ones


# --------------------------------------------------------------------------------------
# Decisions: pure functions of integers.


def block_keep(seed: int, step: int, p: float) -> bool:
    """Block-mode decision: is the branch kept at ``step``? A pure function of
    ``(seed, step, p)``, identical on every process and device."""
    return masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_BLOCK, step) >= masks.drop_threshold(p)


def _keep_indices(key: int, first: int, n: int, p: float, device: torch.device) -> Tensor:
    """Keep decisions of indices ``[first, first + n)`` under ``key``, bool, shape (n,)."""
    index = torch.arange(first, first + n, dtype=torch.int64, device=device)
    return masks.hash_grid(key, index) >= masks.drop_threshold(p)


def _row_factors(keep: Tensor, ndim: int, p: float, dtype: torch.dtype) -> Tensor:
    """Per-row factors ``keep / (1 - p)``, shaped ``(B, 1, ..., 1)`` to broadcast."""
    factor = keep.to(dtype) * (1.0 / (1.0 - p))
    return factor.reshape(-1, *([1] * (ndim - 1)))


def stochastic_depth(
    x: Tensor,
    p: float,
    mode: Mode = "block",
    training: bool = True,
    *,
    seed: int = 0,
    step: int = 0,
) -> Tensor:
    """Functional stochastic depth on a residual branch's output. See :class:`StochasticDepth`.

    Args:
        x: the residual branch's output, shape ``(B, *)``.
        p: drop probability in ``[0, 1)``.
        mode: ``"block"`` (one decision for the batch) or ``"sample"`` (one per row).
        training: ``False`` returns ``x`` unchanged.
        seed, step: the decision is a hash of these (and, in sample mode, of the row's
            index in the global batch).

    Returns:
        ``x * keep / (1 - p)``: the same shape and dtype as ``x``. In block mode a
        dropped branch returns ``x * 0`` (the graph is kept; to skip computing the
        branch use :class:`StochasticDepthBlock` or :meth:`StochasticDepth.draw_scale`).

    Example:
        >>> import torch
        >>> y = stochastic_depth(torch.ones(4, 3), 0.5, "block", seed=0, step=0)
        >>> sorted(set(y.flatten().tolist())) in ([0.0], [2.0])
        True
    """
    owner = "stochastic_depth"
    config = StochasticDepthConfig(p=p, mode=mode, owner=owner)
    seed = check_seed(owner, seed)
    step = check_int(owner, "step", step, 0)
    if not check_bool(owner, "training", training):
        return x
    check_input(owner, x, rows=config.mode == "sample")
    factor = _draw(x, config, seed, step)
    return x if isinstance(factor, float) and factor == 1.0 else x * factor


def _draw(x: Tensor, config: StochasticDepthConfig, seed: int, step: int) -> Tensor | float:
    """This step's factors for ``x`` (``seed``: the decision seed), shared by the module
    and the function: 1.0 while the (warm-up) rate is 0, else :func:`_factors`."""
    p = warmup_rate(config.p, config.warmup_steps, step) if config.drops_at(step) else 0.0
    if p == 0.0:
        return 1.0
    return _factors(x, p, config.mode, seed, step)


def _factors(x: Tensor, p: float, mode: str, seed: int, step: int) -> Tensor | float:
    """What the branch ``x`` is multiplied by: a float (block mode: 0 or ``1/(1-p)``)
    or per-row factors shaped ``(B, 1, ..., 1)`` (sample mode)."""
    if mode == "block":
        return 1.0 / (1.0 - p) if block_keep(seed, step, p) else 0.0
    if x.dim() == 0:
        raise ValueError(
            "stochastic_depth: sample mode needs a batch dim, shape (B, *), got a 0-d tensor"
        )
    start, _ = distributed.row_window(x.shape[0])
    key = masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_SAMPLE, step)
    keep = _keep_indices(key, start, x.shape[0], p, x.device)
    return _row_factors(keep, x.dim(), p, x.dtype)


# --------------------------------------------------------------------------------------
# The module.


class MCLayoutError(ValueError):
    """A module saw rows that are not ``passes * rows`` pass-major rows during Monte-Carlo
    passes (:mod:`gyrodrop.uncertainty` then runs one pass per forward)."""


@dataclass(frozen=True)
class MCDraws:
    """Monte-Carlo sampling state (set by :mod:`gyrodrop.uncertainty` only): the batch
    holds ``rows`` rows per MC sample, the first being sample ``first``; decisions are
    keyed by ``key`` and the (sample, row) index instead of the step. ``passes``: MC
    samples in this forward (``None``: not known); ``single``: the rows each module saw
    in a one-sample forward (by ``id``), to tell examples from other rows."""

    rows: int
    first: int
    key: int
    passes: int | None = None
    single: dict[int, int] | None = None


class StochasticDepth(SteppedModule):
    """Stochastic depth on a residual branch's output: ``forward(branch) -> dropped or
    scaled branch``; add the result to the shortcut.

    Args:
        p: drop probability of the branch, in ``[0, 1)``.
        mode: ``"block"``: the whole batch drops the branch together (one decision per
            step; identical on every DDP rank). ``"sample"``: each example decides
            alone (keyed by its row in the global batch, so DDP matches one process).
        seed: seeds the decisions; a buffer, so it is checkpointed.
        drop_mode: ``"standard"`` (default: drop all run long), ``"early"`` (drop
            before ``cutoff_step`` only, the identity after: early dropout against
            underfitting) or ``"late"`` (the reverse); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps`` in ``(0, 1)``: ``cutoff_step = round(drop_cutoff *
            total_steps)`` (``total_steps`` serves only this).
        cutoff_step: the cutoff as a step (instead of ``drop_cutoff``).
        auto_step: ``True``: the step advances by itself, once per training step (per
            training forward of the model after :func:`gyrodrop.apply_stochastic_depth`,
            per call for a module on its own; see :class:`~gyrodrop.GyroDropout`).
            ``False``: call :func:`gyrodrop.step` after each optimizer step.
        warmup_steps: the drop rate ramps linearly from 0 at step 0 to ``p`` at step
            ``warmup_steps`` and stays there (0: no warm-up). Kept branches are scaled
            by the current rate, so the expectation is exact at every step.
        per_rank: block mode under data parallelism: ``False`` (default): every rank
            makes the same decision; ``True``: each rank decides alone (its rank mixed
            into the seed; Composer's ``use_same_gpu_seed=False``). Sample mode already
            decides per example.

    Shape: input ``(B, *)``, output the same. ``eval()``: the identity.

    Used alone it multiplies (a dropped branch was still computed). To skip the work,
    let :func:`gyrodrop.apply_stochastic_depth` wrap the block, or call
    :meth:`draw_scale` before computing the branch.

    Example:
        >>> import torch, gyrodrop
        >>> sd = gyrodrop.StochasticDepth(0.5, "sample", seed=1)
        >>> y = sd(torch.ones(6, 2))
        >>> sorted(set(y.flatten().tolist())) <= [0.0, 2.0]
        True
        >>> int(sd.step)
        1
        >>> bool(torch.equal(sd.eval()(torch.ones(6, 2)), torch.ones(6, 2)))
        True
    """

    config: StochasticDepthConfig
    config_class = StochasticDepthConfig
    p: float  # these read config (see SteppedModule.config_class)
    mode: Mode
    warmup_steps: int
    per_rank: bool

    def __init__(
        self,
        p: float,
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        drop_mode: DropMode = "standard",
        drop_cutoff: float | None = None,
        cutoff_step: int | None = None,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        per_rank: bool = False,
    ) -> None:
        owner = type(self).__name__
        config = StochasticDepthConfig(
            p=p,
            mode=mode,
            warmup_steps=warmup_steps,
            per_rank=per_rank,
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            cutoff_step=cutoff_step,
            total_steps=total_steps,
            owner=owner,
        )
        super().__init__(seed=seed, auto_step=auto_step, owner=owner)
        self.config = config
        self._mc: MCDraws | None = None

    def decision_seed(self) -> int:
        """The seed of the block-mode decisions: the ``seed`` buffer, mixed with this
        process's rank when ``per_rank`` (rank 0 without a process group)."""
        seed = self.current_seed()
        if not self.per_rank:
            return seed
        place = distributed._rank_and_world(None)
        return masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_RANK, 0 if place is None else place[0])

    def rate(self, step: int | None = None) -> float:
        """The drop rate at ``step`` (default: the current step): ``p``, ramped linearly
        from 0 over the first ``warmup_steps`` steps; 0 at the steps where ``drop_mode``
        does not drop (after the cutoff when early, before it when late)."""
        step = self._step_arg(step, "rate")
        config = self.config
        return warmup_rate(config.p, config.warmup_steps, step) if config.drops_at(step) else 0.0

    @torch.compiler.disable
    def draw_scale(self) -> float:
        """Block mode: this step's factor for the branch, ``0.0`` (dropped: do not
        compute the branch) or ``1/(1-rate)`` (kept); advances the step when
        ``auto_step`` (see :meth:`forward_step`: an activation-checkpoint recompute
        gets the same decision). Call once per training forward, before computing the
        branch::

            scale = self.drop_path.draw_scale()
            out = shortcut if scale == 0.0 else shortcut + scale * self.branch(x)
        """
        if self.mode != "block":
            raise ValueError(
                f"{type(self).__name__}: draw_scale() is for mode='block', got "
                f"mode={self.mode!r}; call the module on the branch output instead"
            )
        if self.step.is_meta:
            return 1.0  # shapes only
        step = self._forward_step()  # within a compiler-disabled method
        p = self.rate(step)
        if p == 0.0:
            return 1.0
        return 1.0 / (1.0 - p) if block_keep(self.decision_seed(), step, p) else 0.0

    @property
    def mc_active(self) -> bool:
        """Whether Monte-Carlo sampling is on (:meth:`set_mc_draws`)."""
        return self._mc is not None

    def set_mc_draws(self, draws: MCDraws | None) -> MCDraws | None:
        """Switch Monte-Carlo sampling on (``draws``) or off (``None``); returns the
        previous state. While on, each Monte-Carlo sample gets its own decision keyed by
        ``draws.key`` instead of the step (what :func:`gyrodrop.mc_predict` uses)."""
        previous, self._mc = self._mc, draws
        return previous

    def _mc_forward(self, x: Tensor, mc: MCDraws) -> Tensor:
        """Monte-Carlo sampling: block mode decides per MC sample (its ``rows`` rows
        together), sample mode per (sample, row); independent of the step."""
        p = self.p
        if p == 0.0:
            return x
        key = masks.mix_keys(self.current_seed(), masks.TAG_DEPTH, _STREAM_MC, mc.key)
        n = x.shape[0]
        if mc.single is not None and mc.passes == 1:
            mc.single.setdefault(id(self), n)
        examples = mc.single is None or mc.single.get(id(self), mc.rows) == mc.rows
        if mc.passes is not None and (n != mc.passes * mc.rows or not examples):
            # the rows are not the passes' examples (a (B*T, H) flattening, windows)
            if mc.passes != 1:  # the caller then runs one pass per forward
                raise MCLayoutError(
                    f"{type(self).__name__}: {x.shape[0]} rows for {mc.passes} "
                    f"passes of {mc.rows} examples"
                )
            # one pass: all its rows, keys disjoint from other passes'
            if self.mode == "block":
                keep = _keep_indices(key, mc.first, 1, p, x.device).expand(n)
            else:
                keep = _keep_indices(key ^ _SAMPLE_SALT, mc.first * n, n, p, x.device)
        elif self.mode == "block":
            if x.shape[0] % mc.rows:
                raise ValueError(
                    f"{type(self).__name__}: Monte-Carlo batch of {x.shape[0]} rows is not "
                    f"a multiple of {mc.rows} rows per sample"
                )
            keep = _keep_indices(key, mc.first, x.shape[0] // mc.rows, p, x.device)
            keep = keep.repeat_interleave(mc.rows)
        else:
            keep = _keep_indices(key ^ _SAMPLE_SALT, mc.first * mc.rows, x.shape[0], p, x.device)
        return x * _row_factors(keep, x.dim(), p, x.dtype)

    @torch.compiler.disable
    def _draw(self, x: Tensor) -> Tensor | float:
        """This step's factors for ``x`` (see :func:`stochastic_depth`); advances the
        step when ``auto_step``. Bookkeeping runs eagerly under ``torch.compile``."""
        step = self._forward_step()  # within a compiler-disabled method
        seed = self.decision_seed() if self.config.mode == "block" else self.current_seed()
        return _draw(x, self.config, seed, step)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        check_input(type(self).__name__, x, rows=self.mode == "sample" or self._mc is not None)
        if self._mc is not None:
            return self._mc_forward(x, self._mc)
        if x.is_meta:
            return x.clone()  # shapes only: no decision, no step
        factor = self._draw(x)
        return x if isinstance(factor, float) and factor == 1.0 else x * factor
