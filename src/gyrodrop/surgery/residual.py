"""Which modules of a model are residual blocks or transformer layers that
:func:`gyrodrop.apply_stochastic_depth` can wrap: model analysis for stochastic-depth
surgery (structure of torchvision-shaped blocks, the :class:`ResidualBlock` protocol,
layer stacks, and probes that check shapes on a small input)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gyrodrop.stochastic_depth import (
    LAYER_LIST_NAMES,
    LayerSplit,
    MethodSplit,
    Split,
    StochasticDepthBlock,
    StochasticDepthLayer,
    Structure,
    declares_protocol,
    eval_mode,
    first_output,
    hidden_of,
    shape_error,
    structural_split,
    targeted_split,
)

__all__ = ["find_residual_blocks", "layer_list_candidates", "LAYER_LIST_NAMES", "Target"]

Target = type | tuple[type, ...] | Callable[[nn.Module], bool]


def find_residual_blocks(
    model: nn.Module, target: Target | None = None, example_inputs: Any = None
) -> list[tuple[str, nn.Module, Split | LayerSplit]]:
    """The residual blocks and layers of ``model`` that
    :func:`gyrodrop.apply_stochastic_depth` would wrap, as ``(name, module, split)`` in
    ``named_modules`` order (input to output for sequential nets); ``split`` is a
    :class:`LayerSplit` for modules wrapped whole (:class:`StochasticDepthLayer`).

    ``target=None`` finds torchvision-shaped blocks, blocks whose class defines
    ``branch`` and ``shortcut`` methods, and the layers of transformer layer stacks
    (:func:`layer_list_candidates`) that keep the shape of their hidden states. A type,
    tuple of types or predicate selects modules explicitly: splittable blocks become
    blocks, anything else a whole layer, which must keep its input's shape
    (``ValueError`` otherwise). Modules nested in a selected one and modules already
    wrapped are skipped.

    Shapes are checked by running the model once in eval mode on ``example_inputs``
    (a tensor, a tuple of positional arguments or a dict of keywords), on probe inputs
    for a Hugging Face model (``pixel_values`` from its config, or its
    ``dummy_inputs``), or by running a layer alone on a probe input built from its first
    ``Linear``/``LayerNorm``/attention/conv; a layer none of these can run is checked at
    its first training forward instead.
    """
    if target is None:
        select: Callable[[nn.Module], bool] | None = None
    elif isinstance(target, type) or (
        isinstance(target, tuple) and all(isinstance(t, type) for t in target)
    ):
        types = target

        def select(m: nn.Module) -> bool:
            return isinstance(m, types)

    elif callable(target):
        select = target
    else:
        raise ValueError(
            "apply_stochastic_depth: target must be None, a module type, a tuple of types "
            f"or a predicate module -> bool, got {target!r}"
        )
    found: list[tuple[str, nn.Module, Split | LayerSplit]] = []
    claimed: list[str] = []  # prefixes of selected or wrapped modules
    layers: list[tuple[str, nn.Module]] = []  # to wrap whole, once shapes are checked

    def inside(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in claimed)

    for name, module in model.named_modules():
        if not name or inside(name):
            continue
        if isinstance(module, (StochasticDepthBlock, StochasticDepthLayer)):
            claimed.append(name)
            continue
        split: Split | None
        if select is None:
            split = MethodSplit() if declares_protocol(module) else structural_split(module)
        elif select(module):
            split = targeted_split(module, allow_layer=True)
            if split is None:
                layers.append((name, module))
                claimed.append(name)
                continue
        else:
            split = None
        if split is not None:
            found.append((name, module, split))
            claimed.append(name)
    if select is None:
        layers = [(n, m) for n, m in layer_list_candidates(model) if not inside(n)]
    if layers:
        example = _auto_example(model) if example_inputs is None else example_inputs
        probed = {} if example is None else _probe_shapes(model, [m for _, m in layers], example)
        for name, module in layers:
            probe = _probe_layer(module, probed)
            if probe is None:  # checked at the first training forward
                found.append((name, module, LayerSplit()))
            elif _keeps_shape(*probe):
                found.append((name, module, LayerSplit(Structure.of(probe[1]))))
            elif select is not None:
                raise shape_error("apply_stochastic_depth", name, *probe)
            # else: auto-detected but not shape-keeping; not a residual layer
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        found.sort(key=lambda item: order[item[0]])
    return found


def _probe_input(module: nn.Module) -> Tensor | None:
    """A small seeded input for ``module`` from its first layer with a known input size
    (``Linear``, ``MultiheadAttention``, ``LayerNorm``, ``Conv``), or ``None``."""
    for m in module.modules():
        size: int | None = None
        weight: Tensor | None = None
        if isinstance(m, nn.Linear):
            size, weight = m.in_features, m.weight
        elif isinstance(m, nn.MultiheadAttention):
            size, weight = m.embed_dim, m.out_proj.weight
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            size, weight = m.normalized_shape[0], m.weight
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
            m, nn.modules.lazy.LazyModuleMixin
        ):
            spatial = m.weight.dim() - 2
            gen = torch.Generator().manual_seed(0x5D)
            x = torch.randn((2, m.in_channels, *([8] * spatial)), generator=gen)
            return x.to(device=m.weight.device, dtype=m.weight.dtype)
        else:
            continue
        if weight is None or weight.device.type == "meta":
            return None
        gen = torch.Generator().manual_seed(0x5D)
        x = torch.randn((2, 3, size), generator=gen)
        return x.to(device=weight.device, dtype=weight.dtype)
    return None


def _probe_shapes(
    model: nn.Module, modules: Sequence[nn.Module], example_inputs: Any
) -> dict[int, tuple[torch.Size, Any]]:
    """Run ``model`` once (eval, no grad) on ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keywords) and record each module's input hidden
    shape and output: ``id(module) -> (shape, output)``. Empty when the run fails."""
    seen: dict[int, tuple[torch.Size, Any]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        with contextlib.suppress(ValueError):
            seen.setdefault(id(m), (hidden_of("probe", args, kwargs).shape, out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    except Exception:  # noqa: BLE001 - an inconclusive probe: check at the first forward
        seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _auto_example(model: nn.Module) -> Any:
    """Probe inputs for a Hugging Face model built from a config: ``pixel_values`` for
    vision models (``config.image_size``, ``config.num_channels``), else its
    ``dummy_inputs``; ``None`` when neither applies."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "meta":
        return None
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        gen = torch.Generator().manual_seed(0x5D)
        pixels = torch.randn((1, channels, size, size), generator=gen)
        return {"pixel_values": pixels.to(device=first.device, dtype=first.dtype)}
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict):
        return {k: v.to(first.device) if isinstance(v, Tensor) else v for k, v in dummy.items()}
    return None


def _probe_layer(
    module: nn.Module, probed: dict[int, tuple[torch.Size, Any]]
) -> tuple[torch.Size, Any] | None:
    """``(input hidden shape, output)`` of ``module``: from the model probe, else from a
    probe of the module alone; ``None`` when neither could run it."""
    if id(module) in probed:
        return probed[id(module)]
    x = _probe_input(module)
    if x is None:
        return None
    try:
        with eval_mode(module), torch.no_grad():
            return x.shape, module(x)
    except Exception:  # noqa: BLE001 - needs other arguments: check at first forward
        return None


def _keeps_shape(shape: torch.Size, out: Any) -> bool:
    first = first_output(out)
    return isinstance(first, Tensor) and first.shape == shape


def layer_list_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of the model's layer stacks: elements of ``nn.ModuleList`` attributes
    named in :data:`LAYER_LIST_NAMES` whose elements share one class named ``*Layer``
    or ``*Block`` (``BertLayer``, ``LlamaDecoderLayer``, ``GPT2Block``, ...), innermost
    stacks only (Swin's ``blocks`` inside its ``layers`` stages), in ``named_modules`` order."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and name.rpartition(".")[2] in LAYER_LIST_NAMES
        and len(m) > 0
        and len({type(e) for e in m}) == 1
        and not isinstance(m[0], (StochasticDepthBlock, StochasticDepthLayer))
        and type(m[0]).__name__.endswith(("Layer", "Block"))
        and any(True for _ in m[0].parameters())
    ]
    names = [n for n, _ in lists]
    inner = [
        (name, m)
        for name, m in lists
        if not any(other.startswith(name + ".") for other in names if other != name)
    ]
    return [(f"{name}.{i}", layer) for name, m in inner for i, layer in enumerate(m)]
