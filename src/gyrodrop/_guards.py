"""What a gyrodrop layer refuses, and when it is running inside a backward (the bottom
layer: torch only).

- :func:`check_input`: inputs a layer cannot compute right (not a tensor, integer or
  bool, under ``torch.func.vmap`` when masks depend on the row);
- :func:`refuse_export`: a training forward recorded by ``torch.jit.trace`` or
  ``torch.export`` (the graph would freeze one step's masks);
- :func:`check_step`: a step given to a public method (``active_masks(step=...)``);
- :func:`bad_counter`: a checkpoint's ``step`` / seed that no layer could hold;
- :func:`in_backward`: whether autograd runs a backward (activation-checkpoint
  recompute).

:mod:`gyrodrop.stepping` re-exports the public ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gyrodrop._validation import check_step_count

__all__ = [
    "in_backward",
    "check_input",
    "check_step",
    "refuse_export",
    "refuse_bad_counters",
    "bad_counter",
    "EXPORT_HINT",
]


def in_backward() -> bool:
    """Is the autograd engine executing a backward on this thread? True while
    activation checkpointing (``torch.utils.checkpoint``, reentrant or not) recomputes
    a forward, so the recompute can replay the step of the original forward."""
    return bool(torch._C._current_graph_task_id() != -1)


def _vmapped(x: Tensor) -> bool:
    """Is ``x`` batched by ``torch.func.vmap`` (at any level)?"""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def check_input(owner: str, x: Any, *, rows: bool = True) -> None:
    """Refuse what a gyrodrop layer cannot compute right, with an error naming it: a
    non-tensor, an integer or bool tensor (masks are scaled by ``1/(1-p)``, which such
    a tensor cannot hold; ``nn.Dropout`` refuses it too), and, when the layer's masks
    depend on the row of the batch (``rows=True``), an input batched by
    ``torch.func.vmap`` (each call would see one row and give every sample the first
    row's mask; ``nn.Dropout`` refuses vmap too)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(
            f"{owner}: input must be a floating-point tensor, got dtype {x.dtype}; dropout "
            "scales kept values by 1/(1-p), which an integer or bool tensor cannot hold "
            "(nn.Dropout refuses it too); hint: x.float()"
        )
    if rows and not torch.compiler.is_compiling() and _vmapped(x):
        raise RuntimeError(
            f"{owner}: cannot run in training mode under torch.func.vmap: its masks "
            "depend on each example's row in the batch, which vmap hides (every example "
            "would get the first row's mask). Hint: compute per-sample gradients with the "
            "model in eval(), or call the layer on the whole batch outside vmap"
        )


def check_step(module: Any, method: str, step: Any) -> Any:
    """``step`` as given to ``module``'s public method ``method`` (``active_masks``,
    ``rate``, ...): an int ``>= 0`` (a 0-d integer tensor passes as it is: the compiled
    path's step).

    Raises:
        ValueError: e.g. ``"GyroDropout.active_masks: step must be an int, got 1.5"``.
    """
    if isinstance(step, Tensor) and step.dim() == 0 and not step.is_floating_point():
        return step
    return check_step_count(f"{type(module).__name__}.{method}", "step", step)


def refuse_bad_counters(
    owner: str, names: Sequence[str], state_dict: Any, prefix: str, error_msgs: list[str]
) -> None:
    """In ``_load_from_state_dict``: a counter no layer could hold (:func:`bad_counter`)
    is refused as torch refuses a wrong shape: named in ``error_msgs`` (so
    ``load_state_dict`` raises) and not loaded (its key is taken out of the copy of the
    state dict that ``load_state_dict`` reads)."""
    for name in names:
        problem = bad_counter(name, state_dict.get(prefix + name))
        if problem is not None:
            del state_dict[prefix + name]
            where = f" {prefix.rstrip('.')!r}" if prefix else ""
            error_msgs.append(f"{owner}{where}: {problem}")


def bad_counter(name: str, value: Any) -> str | None:
    """Why a checkpoint's ``step`` / ``seed`` / ``schedule_seed`` cannot be loaded (a
    value below 0, a fraction), or ``None`` (fine, or not a one-element tensor: torch
    reports a wrong shape itself)."""
    if not isinstance(value, Tensor) or value.numel() != 1 or value.is_meta:
        return None
    if value.dtype == torch.bool or value.is_complex():
        return f"the checkpoint's {name} must be an integer, got dtype {value.dtype}"
    number = value.item()
    if number < 0 or number != int(number):
        return (
            f"the checkpoint's {name} must be an int >= 0, got {number}; "
            "hint: the checkpoint was edited or comes from other software"
        )
    return None


EXPORT_HINT = (
    "undo the surgery first with gyrodrop.remove_gyro_dropout(model) (and "
    "gyrodrop.surgery.remove_stochastic_depth(model)), which leaves eval() outputs "
    "unchanged, or export the model in eval mode (model.eval(): gyrodrop layers are then "
    "the identity, BlockGyroLinear a Linear) with torch.export.export or torch.jit.trace"
)


def refuse_export(owner: str) -> None:
    """Refuse a training forward that ``torch.jit.trace`` or ``torch.export`` records:
    the graph would freeze this step's masks (and never advance the step)."""
    tracer = (
        "torch.jit.trace"
        if torch.jit.is_tracing()  # type: ignore[attr-defined]
        else "torch.export"
        if torch.compiler.is_exporting()
        else None
    )
    if tracer is not None:
        raise RuntimeError(
            f"{owner}: cannot be recorded by {tracer} in training mode: the graph would "
            "freeze this step's masks and never advance the step. Hint: call model.eval() "
            "before exporting, or undo the surgery first with gyrodrop.remove_gyro_dropout"
            "(model) (and gyrodrop.surgery.remove_stochastic_depth(model))"
        )


def has_meta_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, Tensor) and a.is_meta for a in (*args, *kwargs.values()))
