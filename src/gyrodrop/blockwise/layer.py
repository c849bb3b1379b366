"""Block-wise gyro dropout fused into a Linear layer, with pruned GEMMs.

Block-wise gyro dropout (Lee et al., MLSys 2022, section 4) drops blocks of
``block_size`` adjacent neurons instead of single neurons, and every subnetwork mask
drops exactly ``round(p * n_blocks)`` blocks. The batch is split into
``subnets_per_step`` contiguous row groups, one mask each (as in
:class:`~gyrodrop.GyroDropout`), so every group keeps the same number of blocks and one
batched GEMM computes all groups on their kept columns only: the dropped blocks are
never multiplied, in the forward pass, in the input gradient or in the weight gradient.

Two placements, as in the paper (section 4.3):

* ``prune="input"`` (``Dropout -> Linear``): the mask is on the Linear's *input*
  features. The forward computes ``x_g[:, K_g] @ W[:, K_g].T`` per group ``g`` (``K_g``
  its kept input columns); the input gradient is ``dy_g @ W[:, K_g]`` scattered into
  the kept columns (dropped columns get zero, as dropout would give); the weight
  gradient ``dy_g.T @ x_g[:, K_g]`` only touches the kept columns of ``W``. The output
  is dense.
* ``prune="output"`` (``Linear -> Dropout``): the mask is on the Linear's *output*
  features. Only the kept output columns are computed, the others are written as zeros
  (the layer's output is what dropout after the Linear would give); the input gradient
  and the weight gradient use only the kept rows of ``W``. It pays a scatter of the
  output and a gather of the output gradient that input pruning does not need, but its
  gathers of ``W`` move whole rows; on the CPU both placements cost about the same.

Either placement shrinks the three GEMMs of *its* Linear to about ``1 - p``, so the
choice is which Linear next to a dropout is bigger: input pruning for the one after it,
output pruning for the one before it (through a ReLU, which commutes with a non-negative
mask), and output pruning where the dropout feeds no Linear (a residual add, a norm).
:func:`find_block_sites` with ``prune="auto"`` makes that choice for a whole model.

Memory layout: ``W`` is ``(out, in)`` row-major, so an input block of ``W`` is
``block_size`` contiguous floats in each row and an output block is ``block_size``
contiguous rows. All gathers and scatters are done at block granularity
(``index_select`` / ``index_copy_`` / ``index_add_`` over contiguous slices of
``block_size`` elements) on views ``(rows * n_blocks, block_size)``, so they are
memcpy-like; per-group GEMM results are written straight into the layout the next op
reads (a strided ``bmm`` output), and temporaries live in per-layer scratch buffers
reused across steps (:class:`_Workspace`). The per-set indices are cached (derived
state: rebuilt when the active set or the batch layout changes, never in
``state_dict``).

Scaling: the mask scales kept features by ``1 / (1 - p_eff)`` with
``p_eff = n_drop / n_blocks`` (:attr:`BlockGyroLinear.effective_p`), the realized
fraction of dropped *blocks*. It is the same for every mask, and since every block is
equally likely to be dropped, every feature is kept with probability exactly
``1 - p_eff``: the scaling is unbiased per feature, including a shorter last block.

Features not divisible by ``block_size``: the last block is shorter. To keep equal kept
widths across groups (one batched GEMM) the layer works on a zero-padded feature space
of ``n_blocks * block_size`` features: the padded columns are zeros, so they contribute
nothing, and the gradients are cut back to the true width. This costs one copy of
``W`` and of the activation per step, and only in that case.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gyrodrop import masks
from gyrodrop._validation import check_bool, check_choice, check_int
from gyrodrop.blockwise import triton_backend
from gyrodrop.blockwise.kernels import Call, compute_dtype, pruned_linear
from gyrodrop.blockwise.plan import Plan, build_plan, n_dropped_blocks
from gyrodrop.blockwise.traced import traced_forward
from gyrodrop.blockwise.triton_backend import TritonPlan
from gyrodrop.blockwise.workspace import Workspace
from gyrodrop.config import PRUNE_MODES, BlockGyroConfig, DropMode, Prune, Schedule
from gyrodrop.schedule import check_input
from gyrodrop.scheduled import ScheduledModule

__all__ = ["BlockGyroLinear", "Prune", "PRUNE_MODES", "Backend", "BACKENDS", "AUTO_PICKS_TRITON"]

#: Which kernels compute the pruned matmuls.
Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
# Whether backend="auto" sends CUDA inputs to the Triton kernels. False until the
# kernels have been validated and measured on a GPU (benchmarks/gpu_check.py): a default
# must never run code that was only checked in Triton's interpreter.
AUTO_PICKS_TRITON = False


class BlockGyroLinear(ScheduledModule):
    """A Linear layer with block-wise gyro dropout fused in, computing only kept blocks.

    ``prune="input"`` is ``nn.Linear(nn.Dropout(p)(x))`` and ``prune="output"`` is
    ``nn.Dropout(p)(nn.Linear(x))``, with gyro-scheduled block masks instead of fresh
    element masks: the ``num_subnets`` (sigma) subnetworks each drop exactly
    ``round(p * n_blocks)`` of the ``n_blocks = ceil(features / block_size)`` blocks of
    adjacent features; ``subnets_per_step`` (tau) of them are active at a time, one per
    contiguous row group of the batch, and a set stays active for ``steps_per_set``
    steps (the same schedule, seeding, state and step rules as
    :class:`~gyrodrop.GyroDropout`). See the module docstring for how the GEMMs are
    pruned and for the memory layout.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        p: drop probability of each block, in ``[0, 1)``. The realized rate is
            :attr:`effective_p` ``= round(p * n_blocks) / n_blocks``, and kept values are
            scaled by ``1 / (1 - effective_p)``.
        num_subnets: sigma, the number of pre-selected subnetworks.
        subnets_per_step: tau, subnetworks trained at once (one per row group). The
            pruned GEMMs pay when each group has many rows (the paper uses 128 rows per
            group: batch 256, tau 2); with few rows per group the gathered weights
            (``tau * (1 - p)`` copies of ``W``'s kept blocks) dominate.
        block_size: adjacent features dropped together (32 in the paper: 128 bytes).
        total_steps: the run's number of steps; sets
            ``steps_per_set = max(1, total_steps * tau // sigma)``.
        steps_per_set: steps each set stays active (instead of ``total_steps``).
            With neither, 1 and a warning.
        schedule: ``"consecutive"`` (the paper's) or ``"random"`` (a fresh set per step).
        seed: seeds the masks (and the schedule unless ``schedule_seed`` is given); a
            buffer, so it is checkpointed.
        drop_mode: ``"standard"`` (default: drop all run long), ``"early"`` (drop
            before ``cutoff_step`` only, the identity after: early dropout against
            underfitting) or ``"late"`` (the reverse); Liu et al., ICML 2023.
        drop_cutoff: with ``"early"``/``"late"``, the cutoff as a fraction of
            ``total_steps`` in ``(0, 1)``: ``cutoff_step = round(drop_cutoff *
            total_steps)``.
        cutoff_step: the cutoff as a step (instead of ``drop_cutoff``).
        auto_step: ``True``: the step advances by itself, once per training step (per
            training forward of the model after :func:`gyrodrop.apply_block_gyro`, per
            call for a layer on its own; see :class:`~gyrodrop.GyroDropout`).
            ``False``: call :func:`gyrodrop.step` after each optimizer step.
        prune: ``"input"`` (dropout before the Linear) or ``"output"`` (after it).
        backend: who runs the pruned GEMMs. ``"torch"``: gathers of the kept blocks
            and batched GEMMs (any device and dtype). ``"triton"``: Triton kernels that
            read the kept blocks in place (:mod:`gyrodrop.blockwise.triton_backend`; CUDA,
            float16/bfloat16/float32; on CPU tensors only under
            ``TRITON_INTERPRET=1``, Triton's slow interpreter, else a ``RuntimeError``).
            ``"auto"`` (default): ``"torch"`` in this release. The Triton kernels are
            checked against the dense reference only in Triton's interpreter so far;
            once ``benchmarks/gpu_check.py`` has passed on a GPU, ``"auto"`` will pick
            ``"triton"`` for CUDA inputs of those dtypes when triton is installed and
            the forward is not being compiled (:data:`AUTO_PICKS_TRITON`). Both compute
            the same function up to float rounding.
        schedule_seed: seeds the order in which subnetworks become active (default:
            ``seed``); layers sharing it train the same network-level subnetworks
            together (:func:`gyrodrop.apply_block_gyro` shares it across layers).
        workspace: keep the scratch buffers of the torch kernels (the gathered kept
            blocks) from step to step instead of allocating them every step: faster
            where fresh memory is slow to touch, at the cost of about ``tau * (1 - p)``
            copies of ``W`` held per layer while training. Off by default; freed by
            ``eval()``, never copied nor pickled (:mod:`gyrodrop.blockwise.workspace`).
        device: of the parameters, as for :class:`torch.nn.Linear`.
        dtype: of the parameters, as for :class:`torch.nn.Linear`.

    Shape: input ``(B, *, in_features)``, output ``(B, *, out_features)``. Row groups
    are formed over dim 0 (samples); the middle dims of a sample share its mask (as
    ``GyroDropout(dims=(-1,))`` on ``(B, T, F)`` sequences). Under
    ``torch.distributed`` the groups span the global batch, as for ``GyroDropout``.
    ``eval()``: a plain ``F.linear``.

    Memory: besides the parameters, each layer keeps scratch buffers between training
    steps (the kept blocks of ``W`` for all groups, about ``tau * (1 - p)`` times the
    weight, and of one batch of activations), so that no step pays page faults for them.

    Example:
        >>> import torch, gyrodrop
        >>> layer = gyrodrop.BlockGyroLinear(
        ...     64, 8, p=0.5, num_subnets=16, block_size=16, steps_per_set=10
        ... )
        >>> layer.n_blocks, layer.n_dropped, layer.effective_p
        (4, 2, 0.5)
        >>> mask = layer.dense_mask(6)  # the masks of the next forward
        >>> x = torch.randn(6, 64)
        >>> ref = torch.nn.functional.linear(x * mask, layer.weight, layer.bias)
        >>> torch.allclose(layer(x), ref, atol=1e-5)
        True
        >>> sorted(set(mask.flatten().tolist()))  # kept values are scaled by 1/(1-p)
        [0.0, 2.0]
    """

    weight: Tensor
    bias: Tensor | None
    config: BlockGyroConfig
    config_class = BlockGyroConfig
    p: float  # these read config (see SteppedModule.config_class)
    block_size: int
    prune: Prune

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        p: float = 0.5,
        num_subnets: int = 256,
        subnets_per_step: int = 2,
        block_size: int = 32,
        total_steps: int | None = None,
        steps_per_set: int | None = None,
        schedule: Schedule = "consecutive",
        seed: int = 0,
        auto_step: bool = True,
        drop_mode: DropMode = "standard",
        drop_cutoff: float | None = None,
        cutoff_step: int | None = None,
        prune: Prune = "input",
        schedule_seed: int | None = None,
        backend: Backend = "auto",
        workspace: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = type(self).__name__
        check_int(owner, "in_features", in_features, 1)
        check_int(owner, "out_features", out_features, 1)
        check_bool(owner, "bias", bias)
        config = BlockGyroConfig(
            p=p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            block_size=block_size,
            total_steps=total_steps,
            steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
            schedule=schedule,
            prune=prune,
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            cutoff_step=cutoff_step,
            owner=owner,
        )
        check_choice(owner, "backend", backend, BACKENDS)
        if backend == "triton" and not triton_backend.is_available():
            raise ValueError(
                f"{owner}: backend='triton' needs the triton package "
                "(pip install 'gyrodrop[triton]'); use backend='auto' or 'torch'"
            )
        super().__init__(
            config,
            seed=seed,
            auto_step=auto_step,
            schedule_seed=schedule_seed,
            total_steps=total_steps,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.workspace = check_bool(owner, "workspace", workspace)
        if config.p > 0 and self.n_dropped == 0:
            warnings.warn(
                f"{owner}: p={config.p} rounds to 0 of {self.n_blocks} blocks "
                f"(block_size={config.block_size}): the layer is a plain Linear; "
                "lower block_size or raise p",
                UserWarning,
                stacklevel=2,
            )
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()
        if device is not None:  # the counters too (on meta: materialized by to_empty)
            self._buffers_to(self.weight.device)
        # Derived state (never in state_dict): the kept blocks of the active set and
        # the gather/scatter indices for the current batch layout.
        self._plan_key: tuple[Any, ...] | None = None
        self._plan_kept: Tensor | None = None  # the kept blocks self._plan was built for
        self._plan: Plan | TritonPlan | None = None
        self._workspace: Workspace | None = None  # opt-in: see ``workspace``

    # -- construction ------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Initialize ``weight`` and ``bias`` as :class:`torch.nn.Linear` does, and the
        ``step`` / seed buffers as construction does (see
        :meth:`gyrodrop.stepping.SteppedModule.reset_parameters`)."""
        super().reset_parameters()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: BlockGyroConfig | None = None, **kwargs: object
    ) -> BlockGyroLinear:
        """A ``BlockGyroLinear`` that keeps ``linear``'s weights: the same
        :class:`~torch.nn.Parameter` objects (so an optimizer built before the swap
        keeps training them), on their device and in their dtype. ``kwargs`` are the
        keyword arguments of the constructor (``p``, ``num_subnets``, ``prune``, ...);
        the settings may come as one ``config`` (:class:`~gyrodrop.config.BlockGyroConfig`)
        instead.

        >>> import torch.nn as nn, gyrodrop
        >>> lin = nn.Linear(64, 10)
        >>> layer = gyrodrop.BlockGyroLinear.from_linear(lin, p=0.25, steps_per_set=5)
        >>> layer.weight is lin.weight
        True
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}"
            )
        for name in ("bias", "device", "dtype"):
            if name in kwargs:
                raise ValueError(
                    f"{cls.__name__}.from_linear: {name} comes from the Linear; do not pass it"
                )
        if config is not None:
            if not isinstance(config, BlockGyroConfig):
                raise TypeError(
                    f"{cls.__name__}.from_linear: config must be a BlockGyroConfig, "
                    f"got {type(config).__name__}"
                )
            kwargs = {**config.hparams(), **kwargs}
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",  # no initialization: the Linear's parameters are reused
            dtype=linear.weight.dtype,
            **kwargs,  # type: ignore[arg-type]
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module._buffers_to(linear.weight.device)
        module.train(linear.training)
        return module

    def _buffers_to(self, device: torch.device) -> None:
        """Move this module's own buffers (step, seeds) to ``device`` (from ``meta``:
        their construction values)."""
        for name, buf in list(self._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta and torch.device(device).type != "meta":
                value = self._initial_counters[name]
                self._buffers[name] = torch.tensor(value, dtype=buf.dtype, device=device)
            else:
                self._buffers[name] = buf.to(device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.config.describe()}, "
            f"n_blocks={self.n_blocks}, n_dropped={self.n_dropped}, "
            f"backend={self.backend}" + (", workspace=True" if self.workspace else "")
        )

    def train(self, mode: bool = True) -> BlockGyroLinear:
        """As :meth:`torch.nn.Module.train`; ``eval()`` also frees the workspace."""
        if not mode:
            self._workspace = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # Derived state (plans, scratch buffers) does not travel with copies.
        state = super().__getstate__()
        state["_workspace"] = None
        state["_plan"] = state["_plan_key"] = state["_plan_kept"] = None
        return state

    def _scratch_space(self) -> Workspace | None:
        """The workspace of this training step (``None``: fresh tensors; always under
        ``torch.compile``, which plans memory itself)."""
        if not self.workspace or torch.compiler.is_compiling():
            return None
        if self._workspace is None:
            self._workspace = Workspace()
        return self._workspace

    # -- masks -------------------------------------------------------------------------

    def _blocks(self) -> tuple[int, int, float]:
        """``(n_blocks, n_dropped, scale)`` for the current config (derived once per
        config: this runs on every training forward)."""
        derived = self.__dict__.get("_blocks_of")
        config = self.config
        if derived is not None and derived[0] is config:
            return derived[1]
        features = self.in_features if config.prune == "input" else self.out_features
        n_blocks = -(-features // config.block_size)
        n_dropped = n_dropped_blocks(config.p, n_blocks)
        if n_dropped >= n_blocks:
            raise ValueError(
                f"{type(self).__name__}: p={config.p} would drop all {n_blocks} blocks of "
                f"the {features} {config.prune} features (block_size={config.block_size}); "
                "lower p or block_size"
            )
        blocks = (n_blocks, n_dropped, 1.0 / (1.0 - n_dropped / n_blocks))
        if not torch.compiler.is_compiling():  # traced: a cache would only add guards
            self.__dict__["_blocks_of"] = (config, blocks)
        return blocks

    @property
    def n_blocks(self) -> int:
        """The number of blocks of ``block_size`` features (the last may be shorter)."""
        return self._blocks()[0]

    @property
    def n_dropped(self) -> int:
        """Blocks every mask drops, ``round(p * n_blocks)``."""
        return self._blocks()[1]

    @property
    def features(self) -> int:
        """The number of features the mask spans (input or output, per ``prune``)."""
        return self.in_features if self.prune == "input" else self.out_features

    @property
    def mask_side(self) -> Literal["input", "output"]:
        """Where the masks apply: the ``"input"`` features or the ``"output"`` ones
        (``prune``)."""
        return self.prune

    @property
    def effective_p(self) -> float:
        """The realized drop rate, ``n_dropped / n_blocks`` (the scaling uses it)."""
        return self.n_dropped / self.n_blocks

    @property
    def scale(self) -> float:
        """The factor applied to kept values, ``1 / (1 - effective_p)``."""
        return self._blocks()[2]

    def block_masks(self, step: int | None = None, device: torch.device | None = None) -> Tensor:
        """Keep masks over blocks of the set active at ``step`` (default: the current
        step), bool, shape ``(subnets_per_step, n_blocks)``; each row drops exactly
        :attr:`n_dropped` blocks."""
        step = self._step_arg(step, "block_masks")
        active = self.subnet_schedule.at_step(self.current_schedule_seed(), step)
        return masks.block_keep_mask(
            self.current_seed(), active, self.n_blocks, self.n_dropped, device=device
        )

    def group_masks(
        self,
        step: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """Scaled feature masks of the active set, shape ``(subnets_per_step, features)``:
        ``1 / (1 - effective_p)`` on kept features, 0 on dropped ones."""
        keep = self.block_masks(self._step_arg(step, "group_masks"), device=device)
        keep = keep.repeat_interleave(self.block_size, dim=1)[:, : self.features]
        return keep.to(dtype) * self.scale

    def subnet_mask(self, k: int, like: Tensor | None = None) -> Tensor:
        """The scaled feature mask of subnetwork ``k``, shape ``(features,)``, in
        ``like``'s dtype and device (float32 on the CPU without ``like``); used by
        subnetwork ensembles (:func:`gyrodrop.subnet_ensemble_predict`)."""
        check_int(type(self).__name__, "k", k, 0, self.num_subnets - 1)
        device = None if like is None else like.device
        ids = torch.tensor([k], dtype=torch.int64)
        keep = masks.block_keep_mask(
            self.current_seed(), ids, self.n_blocks, self.n_dropped, device=device
        )[0]
        keep = keep.repeat_interleave(self.block_size)[: self.features]
        return keep.to(torch.float32 if like is None else like.dtype) * self.scale

    def dense_mask(
        self,
        batch: int,
        step: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """The scaled mask of every row of a local batch of ``batch`` samples at ``step``
        (default: the current one, i.e. the next training forward), shape
        ``(batch, features)``. The training forward equals
        ``F.linear(x * dense_mask(B)[:, None, ..., :], W, b)`` (``prune="input"``) or
        ``F.linear(x, W, b) * dense_mask(B)[...]`` (``prune="output"``)."""
        check_int(type(self).__name__, "batch", batch, 0)
        counts = self.group_counts(batch)
        group = self.group_masks(step, dtype=dtype, device=device)
        rows = torch.repeat_interleave(
            torch.arange(len(counts), device=group.device),
            torch.tensor(counts, device=group.device),
        )
        return group[rows]

    # -- the fused forward -------------------------------------------------------------

    def _kept_blocks(self, device: torch.device, step: int) -> Tensor:
        """Sorted kept block ids of the set active at ``step``,
        ``(tau, n_blocks - n_dropped)``; cached until the set changes."""

        def build(seed: int, active: Tensor) -> Tensor:
            keep = masks.block_keep_mask(seed, active, self.n_blocks, self.n_dropped, device=device)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            return order[:, : self.n_blocks - self.n_dropped].contiguous()

        kept: Tensor = self.for_active_set(step, device, build)
        return kept

    def _use_triton(self, x: Tensor) -> bool:
        """Whether this forward runs the Triton kernels (see ``backend``)."""
        if self.backend != "auto":
            return self.backend == "triton"
        return (
            AUTO_PICKS_TRITON
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling()
            and triton_backend.is_available()
        )

    @torch.compiler.disable
    def _prepare(self, x: Tensor, use_triton: bool = False) -> Plan | TritonPlan | None:
        """The plan of this training forward (``None``: compute a plain Linear; a
        :class:`~gyrodrop.triton_backend.TritonPlan` with ``use_triton``), at the step
        :meth:`forward_step` gives (which may advance it)."""
        plan = None
        batch = x.shape[0]
        step = self._forward_step()  # within a compiler-disabled method
        n_blocks, n_dropped, scale = self._blocks()
        if n_dropped > 0 and x.numel() > 0 and self.config.drops_at(step):
            kept = self._kept_blocks(x.device, step)
            counts = self.group_counts(batch)
            rows_per_sample = x.numel() // (batch * self.in_features)
            key = (tuple(counts), rows_per_sample, use_triton)
            if key != self._plan_key or self._plan is None or self._plan_kept is not kept:
                if use_triton:
                    self._plan = triton_backend.build_plan(
                        kept,
                        counts,
                        rows_per_sample,
                        n_blocks=n_blocks,
                        block_size=self.config.block_size,
                        features=self.features,
                        scale=scale,
                    )
                else:
                    out = self.out_features if self.config.prune == "input" else None
                    self._plan = build_plan(kept, counts, rows_per_sample, n_blocks, out)
                self._plan_key = key
                self._plan_kept = kept
            plan = self._plan
        return plan

    def forward(self, x: Tensor) -> Tensor:
        owner = type(self).__name__
        check_input(owner, x, rows=self.training)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{owner}: expected input (B, *, {self.in_features}), got shape {tuple(x.shape)}"
            )
        weight, bias = self.weight, self.bias
        if not self.training:
            return F.linear(x, weight, bias)
        if x.dim() < 2:
            raise ValueError(
                f"{owner}: training needs a batch dim, input (B, *, {self.in_features}), "
                f"got shape {tuple(x.shape)}; hint: x.unsqueeze(0)"
            )
        if x.is_meta or weight.is_meta:
            # Shapes only (as nn.Linear on the meta device): no masks, no step.
            return F.linear(x, weight, bias)
        use_triton = self._use_triton(x)
        if not use_triton and self.traces_schedule():
            return traced_forward(self, x)
        plan = self._prepare(x, use_triton)
        if plan is None:
            return F.linear(x, weight, bias)
        return self._pruned(x, weight, bias, plan)

    def _pruned(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan | TritonPlan
    ) -> Tensor:
        lead, config = x.shape[:-1], self.config
        x2 = x.reshape(-1, self.in_features)  # (R, I): samples' rows are consecutive
        if isinstance(plan, TritonPlan):  # the Triton backend: no padding, no workspace
            y = triton_backend.pruned_linear(x2, weight, bias, plan, config.prune, compute_dtype(x))
            return y.reshape(*lead, self.out_features)
        n_blocks, _, scale = self._blocks()
        bs = config.block_size
        call = Call(plan, bs, scale, compute_dtype(x), self._scratch_space())
        if config.prune == "input":
            pad = n_blocks * bs - self.in_features
            if pad:  # a shorter last block: work on zero-padded features
                x2, weight = F.pad(x2, (0, pad)), F.pad(weight, (0, pad))
            y = pruned_linear(x2, weight, bias, "input", call)
        else:
            pad = n_blocks * bs - self.out_features
            if pad:
                weight = F.pad(weight, (0, 0, 0, pad))
                bias = None if bias is None else F.pad(bias, (0, pad))
            y = pruned_linear(x2, weight, bias, "output", call)
            if pad:
                y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)
