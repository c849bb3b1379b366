"""The stochastic-depth decision and its module: :func:`stochastic_depth` (a pure
function of ``(seed, step)`` and the input) and :class:`StochasticDepth` (the module
that keeps ``p``, the mode and the step). See :mod:`gyrodrop.stochastic_depth`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gyrodrop import distributed, masks
from gyrodrop._validation import check_bool, check_int, check_seed
from gyrodrop.config import KEPT_ROWS, MODES, DropMode, KeptRows, Mode, StochasticDepthConfig
from gyrodrop.stepping import SteppedModule, check_input, warmup_rate

__all__ = [
    "Mode",
    "MODES",
    "block_keep",
    "stochastic_depth",
    "StochasticDepth",
    "MCDraws",
    "MCLayoutError",
    "KeptRows",
    "KEPT_ROWS",
    "RowDraw",
    "draw_rows",
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


def _n_dropped_rows(rate: float | Tensor, n: int) -> int | Tensor:
    """Rows a ``kept_rows="fixed"`` draw drops from ``n``: ``rate * n`` to the nearest
    integer, halves up."""
    if isinstance(rate, Tensor):
        return torch.floor(rate * n + 0.5).to(torch.int64)
    return int(math.floor(rate * n + 0.5))


@dataclass(frozen=True)
class RowDraw:
    """One step's sample-mode decision for ``B`` local rows (:meth:`StochasticDepth.draw_rows`).

    ``keep``: bool ``(B,)``; ``scale``: what a kept row's branch is multiplied by
    (``1/(1-rate)`` for ``kept_rows="random"``, the count-exact ``B / kept`` for
    ``"fixed"``; a float, or a 0-d tensor when the rate comes from the step tensor);
    ``index``: the kept rows' indices, sorted, int64 ``(kept,)``, or ``None`` when a
    compiled graph cannot have their number as a shape (random rows under
    ``torch.compile``: the caller then multiplies).
    """

    keep: Tensor
    scale: float | Tensor
    index: Tensor | None

    def factors(self, like: Tensor) -> Tensor:
        """Per-row factors ``keep * scale``, shape ``(B, 1, ..., 1)``, ``like``'s dtype."""
        factor = self.keep.to(like.dtype) * self.scale
        return factor.reshape(-1, *([1] * (like.dim() - 1)))


def draw_rows(
    seed: int | Tensor,
    step: int | Tensor,
    rate: float | Tensor,
    batch: int,
    device: torch.device,
    kept_rows: KeptRows = "random",
) -> RowDraw:
    """Sample-mode decisions of the ``batch`` local rows at ``step``: a pure function of
    ``(seed, step, rate)`` and each row's index in the global batch
    (:func:`gyrodrop.distributed.row_window`).

    ``kept_rows="random"``: each row is kept alone with probability ``1 - rate`` (the
    bits of 0.1.0). ``"fixed"``: exactly ``batch - round(rate * batch)`` rows are kept
    per local batch, those of the largest hash values (every row equally likely), so
    the kept count, hence the shapes of a branch computed on the kept rows only, is
    the same every step. ``seed``, ``step`` and ``rate`` may be tensors (the compiled
    path): the same decisions, with tensor ops only.
    """
    start, _ = distributed.row_window(batch)
    key: int | Tensor
    if isinstance(seed, Tensor) or isinstance(step, Tensor):
        key = masks.mix_keys_tensor(seed, masks.TAG_DEPTH, _STREAM_SAMPLE, step)
    else:
        key = masks.mix_keys(seed, masks.TAG_DEPTH, _STREAM_SAMPLE, step)
    index = torch.arange(start, start + batch, dtype=torch.int64, device=device)
    h = masks.hash_grid(key if isinstance(key, int) else key.to(device), index)
    if kept_rows == "random":
        if isinstance(rate, Tensor):
            keep = h >= masks.drop_threshold_tensor(rate).to(device)
            scale: float | Tensor = 1.0 / (1.0 - rate)
        else:
            keep = h >= masks.drop_threshold(rate)
            scale = 1.0 / (1.0 - rate)
        kept = None if torch.compiler.is_compiling() else keep.nonzero().squeeze(1)
        return RowDraw(keep, scale, kept)
    n_drop = _n_dropped_rows(rate, batch)
    local = torch.arange(batch, dtype=torch.int64, device=device)
    order = torch.argsort((h << 31) | local)  # smallest hashes first: the dropped rows
    if isinstance(n_drop, Tensor):  # a rate that depends on the step tensor
        rank = torch.empty_like(order).scatter_(0, order, local)
        keep = rank >= n_drop.to(device)
        scale = batch / (batch - n_drop).clamp_min(1).to(torch.float64)
        return RowDraw(keep, scale, None)
    kept_index = order[n_drop:].sort().values
    keep = torch.zeros(batch, dtype=torch.bool, device=device).index_fill_(0, kept_index, True)
    return RowDraw(keep, batch / max(batch - n_drop, 1), kept_index)


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


def may_skip_empty_branch() -> bool:
    """Whether sample mode may skip a branch that keeps no row of this batch. Only in
    one process: under data parallelism another rank may keep rows of its own, and every
    rank must run the same modules so FSDP's all-gathers / reduce-scatters and DDP's
    gradient reductions stay in step; there the branch runs on zero rows instead."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    return torch.distributed.get_world_size() == 1


def row_coupling(branch: nn.Module) -> str | None:
    """Why ``branch`` cannot be computed on the kept rows only, or ``None``: a module
    inside couples the rows of a batch (BatchNorm in training: its statistics are over
    the batch) or draws by row position (a gyrodrop layer: its masks follow each row's
    place in the batch, which dropping rows would shift)."""
    for name, module in branch.named_modules():
        where = f" {name!r}" if name else ""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            return f"{type(module).__name__}{where} in training couples the rows"
        if isinstance(module, SteppedModule) and module.training:
            return f"{type(module).__name__}{where} draws its masks by row position"
    return None


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
        kept_rows: sample mode: ``"random"`` (default, the draws of 0.1.0): each example
            is kept alone with probability ``1 - rate``, kept rows scaled by
            ``1/(1 - rate)``; ``"fixed"``: exactly ``B - round(rate * B)`` of the ``B``
            local rows are kept every step (every row equally likely), scaled by the
            count-exact ``B / kept``, so a branch computed on the kept rows has the
            same shape every step (``torch.compile`` without recompiles; DINOv2's and
            torchtune's layer dropout do the same).

    Shape: input ``(B, *)``, output the same. ``eval()``: the identity.

    Under ``torch.compile`` sample mode is traced: the step is a tensor and the
    decisions are computed from it in the graph (no graph break, no recompile per
    step). Block mode decides on the host (:meth:`draw_scale`): a graph break.

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
        kept_rows: KeptRows = "random",
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
            kept_rows=kept_rows,
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

    def rate_tensor(self, step: Tensor) -> float | Tensor:
        """:meth:`rate` of a step tensor (the compiled path): ``p`` (a float) without
        warm-up and with ``drop_mode="standard"``, else a float64 0-d tensor with the same
        value as :meth:`rate`."""
        config = self.config
        rate: float | Tensor = config.p
        if config.warmup_steps:
            ramp = (config.p * step.clamp_min(0).to(torch.float64)) / config.warmup_steps
            rate = torch.where(step < config.warmup_steps, ramp, torch.full_like(ramp, config.p))
        if config.drop_mode != "standard":
            rate = torch.where(
                config.drops_at(step),
                torch.as_tensor(rate, dtype=torch.float64, device=step.device),
                0.0,
            )
        return rate

    def _step_and_rate(self) -> tuple[int | Tensor, float | Tensor]:
        """This training forward's step (advanced when ``auto_step``) and rate: Python
        values in eager mode, tensors while compiled."""
        if torch.compiler.is_compiling():
            step_t = self.forward_step_tensor()
            return step_t, self.rate_tensor(step_t)
        step = self.forward_step()
        return step, self.rate(step)

    def draw_rows(self, batch: int, device: torch.device) -> RowDraw | None:
        """Sample mode: this step's decisions for ``batch`` local rows (see
        :func:`draw_rows`), or ``None`` when the rate is 0 (every row kept, unscaled);
        advances the step when ``auto_step`` (an activation-checkpoint recompute gets the
        same decisions). What :class:`StochasticDepthLayer` and
        :class:`StochasticDepthBlock` call to compute a branch on the kept rows only."""
        if self.mode != "sample":
            raise ValueError(
                f"{type(self).__name__}: draw_rows() is for mode='sample', got "
                f"mode={self.mode!r}; use draw_scale()"
            )
        step, rate = self._step_and_rate()
        if isinstance(rate, float) and rate == 0.0:
            return None
        seed = self.seed if torch.compiler.is_compiling() else self.current_seed()
        return draw_rows(seed, step, rate, batch, device, self.config.kept_rows)

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
        step when ``auto_step``. Block mode's bookkeeping runs eagerly under
        ``torch.compile`` (a graph break); sample mode is traced (:meth:`forward`)."""
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
        if self.mode == "sample":
            if x.dim() == 0:
                raise ValueError(
                    f"{type(self).__name__}: sample mode needs a batch dim, shape (B, *), "
                    "got a 0-d tensor"
                )
            draw = self.draw_rows(x.shape[0], x.device)
            return x if draw is None else x * draw.factors(x)
        factor = self._draw(x)
        return x if isinstance(factor, float) and factor == 1.0 else x * factor
