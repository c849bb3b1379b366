"""Block-wise gyro surgery: fuse a model's ``Dropout -> Linear`` (and ``Linear ->
Dropout``) pairs into :class:`~gyrodrop.BlockGyroLinear` layers."""

from __future__ import annotations

import warnings
from typing import Any, cast

from torch import nn

from gyrodrop._modules import check_model, swap_all, unwrap_model
from gyrodrop._validation import check_choice, check_int, check_seed
from gyrodrop.blockwise import BlockGyroLinear, n_dropped_blocks
from gyrodrop.config import BlockGyroConfig, DropMode
from gyrodrop.masks import layer_seed
from gyrodrop.schedule import attach_stepper
from gyrodrop.surgery.blockwise_sites import SURGERY_PRUNE, SurgeryPrune, find_block_sites
from gyrodrop.surgery.common import SurgeryWarning, one_schedule_warning
from gyrodrop.surgery.gyro import DROPOUT_FAMILY

__all__ = ["apply_block_gyro"]


def apply_block_gyro(
    model: nn.Module,
    *,
    p: float | None = None,
    num_subnets: int = 256,
    subnets_per_step: int = 2,
    block_size: int = 32,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    prune: SurgeryPrune = "input",
    drop_mode: DropMode = "standard",
    drop_cutoff: float | None = None,
    **kw: Any,
) -> int:
    """Fuse ``nn.Dropout`` into the adjacent ``nn.Linear`` as block-wise gyro dropout
    (:class:`~gyrodrop.BlockGyroLinear`), in place; returns the number of fused pairs.

    ``prune="input"`` (default) fuses ``Dropout -> Linear``: the Linear becomes an
    input-pruned ``BlockGyroLinear`` and the Dropout an ``nn.Identity``.
    ``prune="output"`` fuses ``Linear [-> ReLU/LeakyReLU/PReLU] -> Dropout`` (dropout
    after the Linear, the activation kept in place: it commutes with the mask).
    ``prune="auto"`` fuses every dropout it can, on the side that prunes the most GEMM
    work (see :func:`gyrodrop.surgery.find_block_sites`). The pairs are found in
    ``nn.Sequential`` containers and, through ``torch.fx`` symbolic tracing, anywhere
    in a traceable model; a model that does not trace whole (Hugging Face models) is
    traced submodule by submodule, so BERT's attention-output and FFN-output
    projections (``dense -> dropout``) are fused with ``prune="output"`` or
    ``"auto"``. GPT-2's ``Conv1D`` (a Linear with a transposed weight) is not fused
    and is named with the reason (:data:`gyrodrop.surgery.blockwise_sites.CONV1D_NOT_FUSED`).
    The model itself is changed in place (its own ``forward``
    still runs: fx only reads the dataflow), and its Linear parameters are kept (an
    optimizer built before keeps working).

    ``p=None`` keeps each Dropout's own ``p``; every fused layer gets its own mask seed
    derived from ``seed`` and its position, and all share the schedule seed ``seed``
    (network-level subnetworks, as in :func:`apply_gyro_dropout`). ``schedule``,
    ``auto_step``, ``backend`` and ``workspace`` (of :class:`~gyrodrop.BlockGyroLinear`)
    may be passed as keywords; stepping is as in
    :func:`apply_gyro_dropout` (one step per training forward of ``model``). Every
    dropout that is not fused (followed by something else than a Linear, a module used
    twice, a functional ``F.dropout``, too few blocks for ``p``, a ``p`` that rounds to
    0 dropped blocks, inside a ``torch.nn`` layer such as
    ``nn.TransformerEncoderLayer`` that tracing does not enter, ``Dropout2d`` and the
    like) is left as it is and named, with the reason, in one warning that counts
    the dropouts left alone. All-or-nothing: when building a fused layer fails, the
    model is unchanged. ``drop_mode="early"`` or ``"late"`` with ``drop_cutoff`` (a
    fraction of ``total_steps`` in ``(0, 1)``) fuses layers that drop only before or
    only after the cutoff step (early and late dropout, Liu et al., ICML 2023): a
    plain ``Linear`` on the other steps.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``; ``block_size`` is not an int
            >= 1 (checked first); ``p``, ``seed``, ``prune`` or the schedule options
            are invalid.

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> model = nn.Sequential(
        ...     nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10)
        ... )
        >>> gyrodrop.apply_block_gyro(model, total_steps=1000)
        1
        >>> type(model[2]).__name__, type(model[3]).__name__, model[3].p
        ('Identity', 'BlockGyroLinear', 0.5)
    """
    owner = "apply_block_gyro"
    check_model(owner, model)
    check_int(owner, "block_size", block_size, 1)
    check_seed(owner, seed)
    check_choice(owner, "prune", prune, SURGERY_PRUNE)
    allowed = {"schedule", "auto_step", "backend", "workspace"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(unknown)}; "
            f"allowed: {sorted(allowed)} besides the named ones"
        )
    schedule = {"schedule": kw.pop("schedule")} if "schedule" in kw else {}
    with one_schedule_warning(owner, total_steps, steps_per_set):
        config = BlockGyroConfig(
            p=0.5 if p is None else p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            block_size=block_size,
            total_steps=total_steps,
            steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            owner=owner,
            **schedule,
        )
    root = unwrap_model(model)
    sites, problems = find_block_sites(root, prune)
    swaps: list[tuple[str, nn.Module]] = []
    fused_dropouts = set()
    for index, site in enumerate(sites):
        dropout = root.get_submodule(site.dropout)
        linear = cast(nn.Linear, root.get_submodule(site.linear))
        rate = cast(float, dropout.p) if p is None else config.p
        features = linear.in_features if site.prune == "input" else linear.out_features
        n_blocks = -(-features // block_size)
        n_dropped = n_dropped_blocks(rate, n_blocks)
        if n_dropped >= n_blocks:
            problems.append(
                f"{site.dropout}: p={rate} would drop all {n_blocks} blocks of "
                f"{site.linear}'s {features} {site.prune} features; lower block_size"
            )
            continue
        if n_dropped == 0:  # fused, the pair would train without dropout
            problems.append(
                f"{site.dropout}: p={rate} rounds to 0 of the {n_blocks} block(s) of "
                f"{site.linear}'s {features} {site.prune} features (block_size="
                f"{block_size}), so a fused layer would drop nothing; lower block_size "
                "or raise p"
            )
            continue
        fused = BlockGyroLinear.from_linear(
            linear,
            config=config.replace(owner=owner, p=rate, prune=site.prune),
            seed=layer_seed(seed, index),
            schedule_seed=seed,
            **kw,
        )
        fused.total_steps = total_steps
        swaps += [(site.linear, fused), (site.dropout, nn.Identity())]
        fused_dropouts.add(site.dropout)
    swap_all(root, swaps)  # only once every fused layer was built
    count = len(fused_dropouts)
    if count and kw.get("auto_step", True):
        attach_stepper(root)
    left, notes = _left_alone(root, fused_dropouts, problems)
    if left:
        warnings.warn(
            f"{owner}: fused {count} pair(s); left {len(left)} dropout(s) as they were: "
            + " | ".join(left)
            + "".join(f" ({note})" for note in notes),
            SurgeryWarning,
            stacklevel=2,
        )
    elif notes:  # every dropout module fused, but functional calls may be unseen
        warnings.warn(
            f"{owner}: fused {count} pair(s); " + "; ".join(notes), SurgeryWarning, stacklevel=2
        )
    elif count == 0:
        warnings.warn(
            f"{owner}: no nn.Dropout found; the model is unchanged",
            SurgeryWarning,
            stacklevel=2,
        )
    return count


def _left_alone(
    root: nn.Module, fused: set[str], problems: list[str]
) -> tuple[list[str], list[str]]:
    """``"name: reason"`` for every dropout of ``root`` that was not fused (dropout
    modules, each once, and functional dropout calls), and the notes of ``problems``
    that are about no single dropout (a failed trace)."""
    by_name: dict[str, list[str]] = {}
    notes: list[str] = []
    for problem in problems:
        name, sep, _ = problem.partition(": ")
        if sep and " " not in name:
            by_name.setdefault(name, []).append(problem)
        else:
            notes.append(problem)
    traced = not any(note.startswith("torch.fx could not trace") for note in notes)
    left: list[str] = []
    seen: set[str] = set()
    modules = dict(root.named_modules())
    for name, module in root.named_modules():
        if not isinstance(module, DROPOUT_FAMILY) or name in fused:
            continue
        seen.add(name)
        if name in by_name:
            left.append(by_name[name].pop(0))
        elif type(module) is not nn.Dropout:
            left.append(
                f"{name}: a {type(module).__name__} is not an element-wise nn.Dropout "
                "(only nn.Dropout is fused)"
            )
        elif (owner := _torch_nn_owner(name, modules)) is not None:
            left.append(
                f"{name}: inside {owner}, a torch.nn layer that is not traced into "
                "(its forward calls the dropout itself)"
            )
        elif not traced:
            left.append(f"{name}: not called by the forward of any submodule that traces")
        else:
            left.append(f"{name}: not called by the model's traced forward")
    # functional dropout calls and other named problems that are no module
    left += [problem for rest in by_name.values() for problem in rest]
    return left, notes


def _torch_nn_owner(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The outermost ancestor of ``name`` that is a ``torch.nn`` layer other than a
    container (``nn.TransformerEncoderLayer``, ``nn.Transformer``, ...), as
    ``"path (Type)"``, or ``None``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        module = modules.get(path)
        if module is None or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if type(module).__module__.startswith("torch.nn"):
            return f"{path} ({type(module).__name__})"
    return None
