"""Prune a layer stack after training with stochastic depth: :func:`prune_layers`
builds the shallower plain model that keeps only the listed layers (fairseq's
``layers_to_keep`` for LayerDrop, Fan et al. 2019)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from gyrodrop._modules import check_model, replace_modules
from gyrodrop._validation import check_int
from gyrodrop.stepping import SteppedModule, detach_stepper
from gyrodrop.stochastic_depth import StochasticDepth
from gyrodrop.surgery.common import SurgeryWarning
from gyrodrop.surgery.gyro import remove_gyro_dropout
from gyrodrop.surgery.residual import layer_list_candidates
from gyrodrop.surgery.stochastic_depth import remove_stochastic_depth

__all__ = ["prune_layers"]

_OWNER = "prune_layers"


def prune_layers(model: nn.Module, keep: Sequence[int] | Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` that keeps only the layers ``keep`` of its layer stack, with
    every gyrodrop module removed: the model to deploy after training with stochastic
    depth (or LayerDrop), which makes the network robust to running fewer layers.

    The stacks are those :func:`gyrodrop.apply_stochastic_depth` wraps whole: Hugging
    Face ``encoder.layer`` (BERT, ViT), ``model.layers`` (Llama), ``transformer.h``
    (GPT-2), ``blocks``, and ``nn.TransformerEncoder/Decoder.layers``
    (:func:`gyrodrop.surgery.find_residual_blocks` lists their layers). The copy:

    - has the kept layers, in their order, as its ``nn.ModuleList`` (state-dict keys
      renumbered ``0 .. len(keep) - 1``, as the model class builds them for a model of
      that depth);
    - carries the new layer count: ``num_layers`` of an ``nn.TransformerEncoder`` /
      ``Decoder``, a Hugging Face ``config.num_hidden_layers`` (and the per-layer
      ``config.layer_types``), and each kept layer's ``layer_idx`` attributes (what
      Hugging Face attention uses to index its KV cache), so ``save_pretrained`` /
      ``from_pretrained`` round-trip the shallower model;
    - is plain: wrapped layers and blocks are unwrapped
      (:func:`~gyrodrop.surgery.remove_stochastic_depth`), gyrodrop dropouts become the
      torch dropouts they replaced (:func:`gyrodrop.remove_gyro_dropout`), standalone
      :class:`~gyrodrop.StochasticDepth` modules become ``nn.Identity`` (their eval
      behaviour), and the model-level stepper and its hooks are gone.

    Its ``eval()`` output equals that of ``model`` run with only the kept layers.
    ``model`` itself is not changed.

    Args:
        model: the trained network (DDP / ``torch.compile`` wrappers are looked
            through; the copy is the unwrapped model).
        keep: indices of the layers to keep, increasing, each in ``[0, depth)`` (e.g.
            ``range(0, depth, 2)``: every other layer, what Fan et al. found best; a 1-d
            tensor or NumPy array of ints is taken as its list); for a
            model with several stacks (an encoder and a decoder), a mapping from each
            stack's dotted name to its indices (stacks not named are left whole). A
            mapping may name any ``nn.ModuleList`` of the model.

    Returns:
        The pruned copy.

    Raises:
        ValueError: ``model`` has no layer stack, ``keep`` is not a list of distinct
            increasing indices in range, or names a stack that is not an
            ``nn.ModuleList``; every message names the argument.

    Warns:
        SurgeryWarning: a Hugging Face config whose layer count could not be matched to
            the pruned stack (an encoder-decoder config, say) was left unchanged.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> net = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        >>> gyrodrop.apply_stochastic_depth(net, drop_rate=0.2)
        4
        >>> small = gyrodrop.prune_layers(net, keep=[0, 2]).eval()
        >>> small.num_layers, len(small.layers)
        (2, 2)
    """
    root = check_model(_OWNER, model)
    pruned = copy.deepcopy(root)
    remove_stochastic_depth(pruned)
    stacks = _layer_stacks(pruned)
    plan = _plan(pruned, stacks, keep)
    remove_gyro_dropout(pruned)
    replace_modules(pruned, {StochasticDepth: lambda m, _: nn.Identity()})
    detach_stepper(pruned)
    left = sorted({type(m).__name__ for m in pruned.modules() if isinstance(m, SteppedModule)})
    if left:  # a gyrodrop layer no undo function knows (the user's own subclass)
        raise ValueError(f"{_OWNER}: model holds gyrodrop modules that cannot be removed: {left}")
    alone = len(stacks) == 1 and len(plan) == 1
    for name, indices in plan.items():
        stack = pruned.get_submodule(name)
        assert isinstance(stack, nn.ModuleList)  # checked by _plan
        depth = len(stack)
        kept = [stack[i] for i in indices]
        for new, (old, layer) in enumerate(zip(indices, kept, strict=True)):
            _renumber(layer, old, new)
        del stack[:]
        stack.extend(kept)
        _update_counts(pruned, name, depth, indices, alone=alone)
    return pruned


def _layer_stacks(model: nn.Module) -> dict[str, int]:
    """The layer stacks of ``model`` (none wrapped by stochastic depth): dotted name of
    each ``nn.ModuleList`` -> its number of layers, in ``named_modules`` order."""
    stacks: dict[str, int] = {}
    for layer_name, _ in layer_list_candidates(model):
        stack = layer_name.rpartition(".")[0]
        stacks[stack] = stacks.get(stack, 0) + 1
    return stacks


def _plan(root: nn.Module, stacks: dict[str, int], keep: Any) -> dict[str, list[int]]:
    """``{stack name: kept indices}`` from ``keep``, every index checked."""
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError(f"{_OWNER}: keep must name at least one stack, got {{}}")
        plan: dict[str, list[int]] = {}
        for name, indices in keep.items():
            if not isinstance(name, str):
                raise ValueError(
                    f"{_OWNER}: keep's keys must be dotted stack names (str), got {name!r}"
                )
            depth = stacks.get(name)
            if depth is None:
                try:
                    target = root.get_submodule(name)
                except AttributeError:
                    target = None
                if not isinstance(target, nn.ModuleList):
                    raise ValueError(
                        f"{_OWNER}: keep names {name!r}, which is not a layer stack (an "
                        f"nn.ModuleList) of the model; its stacks: {sorted(stacks)}"
                    )
                depth = len(target)
            plan[name] = _indices(f"keep[{name!r}]", indices, depth)
        return plan
    if not stacks:
        raise ValueError(
            f"{_OWNER}: model has no layer stack (Hugging Face encoder.layer / "
            "model.layers / transformer.h, nn.TransformerEncoder.layers, ...); hint: pass "
            "keep={'dotted.name.of.modulelist': [...]}"
        )
    if len(stacks) > 1:
        raise ValueError(
            f"{_OWNER}: model has {len(stacks)} layer stacks {sorted(stacks)}; keep must "
            "be a mapping from stack name to the indices to keep in it"
        )
    ((name, depth),) = stacks.items()
    return {name: _indices("keep", keep, depth)}


def _indices(what: str, indices: Any, depth: int) -> list[int]:
    if isinstance(indices, range):
        indices = list(indices)
    elif getattr(indices, "ndim", None) == 1 and callable(getattr(indices, "tolist", None)):
        indices = indices.tolist()  # a 1-d tensor or NumPy array: its Python values
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise ValueError(f"{_OWNER}: {what} must be a sequence of layer indices, got {indices!r}")
    if not indices:
        raise ValueError(f"{_OWNER}: {what} must keep at least one layer, got []")
    out = [check_int(_OWNER, f"{what}[{i}]", v, 0, depth - 1) for i, v in enumerate(indices)]
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(
            f"{_OWNER}: {what} must be distinct layer indices in increasing order, got {out}"
        )
    return out


def _renumber(layer: nn.Module, old: int, new: int) -> None:
    """Set every ``layer_idx`` attribute equal to ``old`` inside ``layer`` to ``new``
    (Hugging Face attention indexes its KV cache by it)."""
    for module in layer.modules():
        value = module.__dict__.get("layer_idx")
        if isinstance(value, int) and not isinstance(value, bool) and value == old:
            setattr(module, "layer_idx", new)  # noqa: B010 - nn.Module's typing


def _update_counts(
    root: nn.Module, name: str, depth: int, indices: list[int], *, alone: bool
) -> None:
    """Record the new depth where the model keeps one: the stack's owner
    (``nn.TransformerEncoder.num_layers``) and a Hugging Face config (only when the
    model has this one stack: an encoder-decoder config's counts are left alone)."""
    kept = len(indices)
    parent_name = name.rpartition(".")[0]
    parent = root.get_submodule(parent_name) if parent_name else root
    if parent.__dict__.get("num_layers") == depth:
        setattr(parent, "num_layers", kept)  # noqa: B010 - nn.Module's typing
    configs = {
        id(c): c
        for m in root.modules()
        if (c := getattr(m, "config", None)) is not None
        and getattr(c, "num_hidden_layers", None) == depth
    }
    for config in configs.values():
        if not alone:
            warnings.warn(
                f"{_OWNER}: the model's config says num_hidden_layers={depth}, and the model "
                f"has several layer stacks; it was left unchanged after pruning {name!r} to "
                f"{kept} layers: set the config's layer counts yourself before saving",
                SurgeryWarning,
                stacklevel=3,
            )
            continue
        config.num_hidden_layers = kept
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == depth:
            config.layer_types = [types[i] for i in indices]
