"""Stochastic depth on a whole layer (a transformer layer): the layer is the residual
branch plus identity, ``x + keep * (f(x) - x) / (1 - p)``; :class:`StochasticDepthLayer`
skips a dropped layer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gyrodrop.stochastic_depth.module import (
    KeptRows,
    Mode,
    StochasticDepth,
    may_skip_empty_branch,
    row_coupling,
)

__all__ = [
    "StochasticDepthLayer",
    "LayerSplit",
    "Structure",
    "LAYER_LIST_NAMES",
    "hidden_of",
    "first_output",
    "shape_error",
]

# --------------------------------------------------------------------------------------
# Whole layers (transformer layers): the layer is the residual branch plus identity.

#: Names of the ``nn.ModuleList`` attributes that hold a model's stack of layers
#: (Hugging Face ``encoder.layer``, ``model.layers``, GPT-2 ``transformer.h``, ViT/Swin
#: ``blocks``, T5 ``block``; ``nn.TransformerEncoder/Decoder.layers``).
LAYER_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")

#: Keyword names under which a layer may receive its hidden states.
_HIDDEN_KWARGS = ("hidden_states", "src", "tgt", "x", "hidden")


class LayerSplit:
    """Marks a module wrapped as a whole layer (:class:`StochasticDepthLayer`), with
    what it returns when a probe at surgery could run it (``structure``)."""

    def __init__(self, structure: Structure | None = None) -> None:
        self.structure = structure


def hidden_of(owner: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The hidden states a layer was called with: its first positional argument, or
    the first of :data:`_HIDDEN_KWARGS` given as a keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for name in _HIDDEN_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, Tensor):
            return value
    raise ValueError(
        f"{owner}: the layer was called without hidden states first (a tensor as the "
        f"first positional argument or one of the keywords {_HIDDEN_KWARGS}); got "
        f"{len(args)} positional and keywords {sorted(kwargs)}"
    )


def first_output(out: Any) -> Any:
    """The hidden states a layer returned: the tensor itself, or the first element of
    a tuple/list or of a ``ModelOutput``-like mapping."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if hasattr(out, "to_tuple") and callable(out.to_tuple):
        items = out.to_tuple()
        return items[0] if items else None
    return None


def _with_first(out: Any, hidden: Tensor) -> Any:
    """``out`` with its hidden states replaced by ``hidden`` (same structure)."""
    if isinstance(out, Tensor):
        return hidden
    if isinstance(out, (tuple, list)):
        return type(out)([hidden, *out[1:]]) if isinstance(out, list) else (hidden, *out[1:])
    first_key = next(iter(out.keys()))
    copy = type(out)(**dict(out.items()))
    copy[first_key] = hidden
    return copy


@dataclass(frozen=True)
class Structure:
    """What a layer returns, learned from one call: to rebuild a pass-through output
    without calling it (other outputs: ``None``, e.g. attention weights)."""

    kind: str  # "tensor" | "tuple" | "list" | "mapping"
    length: int = 1
    cls: type | None = None
    first_key: str | None = None

    @classmethod
    def of(cls, out: Any) -> Structure:
        if isinstance(out, Tensor):
            return cls("tensor")
        if isinstance(out, (tuple, list)):
            return cls("list" if isinstance(out, list) else "tuple", len(out))
        return cls("mapping", cls=type(out), first_key=next(iter(out.keys())))

    def passthrough(self, hidden: Tensor) -> Any:
        if self.kind == "tensor":
            return hidden
        if self.kind in ("tuple", "list"):
            items = [hidden, *([None] * (self.length - 1))]
            return items if self.kind == "list" else tuple(items)
        assert self.cls is not None and self.first_key is not None
        return self.cls(**{self.first_key: hidden})


def shape_error(owner: str, name: str, in_shape: Any, out: Any) -> ValueError:
    first = first_output(out)
    got = tuple(first.shape) if isinstance(first, Tensor) else type(out).__name__
    return ValueError(
        f"{owner}: layer {name!r} returns hidden states of shape {got} from "
        f"hidden states of shape {tuple(in_shape)}; stochastic depth drops a layer by "
        "passing its input through, so the layer must keep the shape. Hint: select "
        "the shape-keeping layers with target= (e.g. the blocks inside a stage, not "
        "the stage that downsamples)"
    )


class StochasticDepthLayer(nn.Module):
    """A whole layer with stochastic depth: ``y = x + keep * (f(x) - x) / (1 - p)``.

    For layers whose output is their input plus a residual (transformer layers:
    Hugging Face ``BertLayer``, ``ViTLayer``, ``LlamaDecoderLayer``, ...,
    ``nn.TransformerEncoderLayer``). ``forward`` takes the hidden states first (or as
    ``hidden_states=``) and any other arguments (attention masks, position ids or
    embeddings, caches), passed on unchanged; the layer returns the hidden states
    first: a tensor, a tuple/list or a ``ModelOutput``.

    - ``eval()``: exactly ``layer(*args, **kwargs)`` (bitwise).
    - training, ``mode="block"``: when dropped, the layer is not computed and the hidden
      states pass through (other outputs, e.g. attention weights, are ``None``); when
      kept, ``x + (f(x) - x) / (1 - p)``.
    - training, ``mode="sample"``: row ``b`` gets ``x_b + keep_b * (f(x)_b - x_b) /
      (1 - p)`` (``B / kept`` for ``kept_rows="fixed"``). The layer is computed on the
      kept rows only (``index_select``, then ``index_add`` back into ``x``: dropped rows
      are the input, exactly) when its rows are independent: no BatchNorm in training
      and no gyrodrop layer inside (:func:`~gyrodrop.stochastic_depth.row_coupling`), no
      other tensor argument with the batch dim, and it returns its hidden states alone
      (learned on the first call, which computes every row). Otherwise every row is
      computed and multiplied, and a ``UserWarning`` says why once, naming the layer.
      Under ``torch.compile`` random rows use the multiply form (their count is not a
      static shape); fixed rows skip.

    The first computed output is checked to have the input's shape (``ValueError``
    naming the layer otherwise). Attributes the wrapper lacks are read from the layer
    (model code such as ``nn.TransformerEncoder`` reads its layers' attributes). Made
    by :func:`gyrodrop.apply_stochastic_depth`; the layer is kept as the child
    ``layer`` (state-dict keys gain a ``layer.`` prefix).

    Args:
        layer: the layer.
        p: drop probability (see :class:`StochasticDepth`, as for the next five).
        mode: ``"block"`` or ``"sample"``.
        seed: seeds the decisions.
        auto_step: who advances the step.
        warmup_steps: steps over which ``p`` ramps up from 0.
        per_rank: independent decisions per data-parallel rank.
        kept_rows: sample mode's rows: ``"random"`` or ``"fixed"`` (see
            :class:`StochasticDepth`).
        name: the layer's name in the model, for error messages.
        split: what a probe at surgery learned about the layer's output.
    """

    _warned_rows = False  # said once why sample mode multiplies (class default: old pickles)

    def __init__(
        self,
        layer: nn.Module,
        p: float,
        mode: Mode = "block",
        *,
        seed: int = 0,
        auto_step: bool = True,
        warmup_steps: int = 0,
        per_rank: bool = False,
        name: str = "",
        split: LayerSplit | None = None,
        kept_rows: KeptRows = "random",
    ) -> None:
        super().__init__()
        self.layer = layer
        self.stochastic_depth = StochasticDepth(
            p,
            mode,
            seed=seed,
            auto_step=auto_step,
            warmup_steps=warmup_steps,
            per_rank=per_rank,
            kept_rows=kept_rows,
        )
        self._name = name
        self._structure: Structure | None = None if split is None else split.structure
        self._warned_rows = False
        self.training = self.stochastic_depth.training = layer.training

    def extra_repr(self) -> str:
        return f"name={self._name!r}" if self._name else ""

    def __getattr__(self, name: str) -> Any:
        # Attributes the model's own code reads from its layers (nn.TransformerEncoder
        # reads ``layers[0].self_attn``, some Hugging Face models ``attention_type``)
        # come from the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer" or "layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["layer"], name)

    def _hidden_out(self, out: Any, x: Tensor) -> Tensor:
        """The output's hidden states, checked against the input's shape; learns the
        output structure on the first call."""
        h = first_output(out)
        if not isinstance(h, Tensor) or h.shape != x.shape:
            raise shape_error("StochasticDepthLayer", self._name, x.shape, out)
        if self._structure is None:
            self._structure = Structure.of(out)
        return h

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.layer(*args, **kwargs)
        x = hidden_of("StochasticDepthLayer", args, kwargs)
        sd = self.stochastic_depth
        if sd.training and sd.mode == "block" and not sd.mc_active:
            scale = sd.draw_scale()
            if scale == 0.0 and self._structure is not None:
                return self._structure.passthrough(x)
            out = self.layer(*args, **kwargs)
            h = self._hidden_out(out, x)
            if scale == 0.0:  # dropped before the structure was known: computed once
                return _with_first(out, x)
            if scale == 1.0:
                return out
            return _with_first(out, torch.add(x, h - x, alpha=scale))
        if (
            sd.training
            and sd.mode == "sample"
            and not sd.mc_active
            and self._skippable(x, args, kwargs)
        ):
            draw = sd.draw_rows(x.shape[0], x.device)
            if draw is not None and draw.index is not None:
                return self._kept_rows_forward(x, args, kwargs, draw.index, draw.scale)
            out = self.layer(*args, **kwargs)
            h = self._hidden_out(out, x)
            delta = h - x
            return _with_first(out, x + (delta if draw is None else delta * draw.factors(x)))
        out = self.layer(*args, **kwargs)
        h = self._hidden_out(out, x)
        return _with_first(out, x + sd(h - x))

    def _skippable(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Can sample mode compute the layer on the kept rows only? Its rows must be
        independent (:func:`~gyrodrop.stochastic_depth.module.row_coupling`), no other
        argument may carry the batch dim (it would need the same rows), and the layer
        must return its hidden states alone (learned on the first call). Says once why
        not, naming the layer."""
        structure = self._structure
        if x.is_meta or x.dim() == 0 or structure is None:
            return False
        reason = row_coupling(self.layer)
        if reason is None and (structure.kind == "mapping" or structure.length != 1):
            reason = "it returns more than its hidden states"
        if reason is None:
            batch = x.shape[0]
            others = [*enumerate(args[1:], 1), *kwargs.items()]
            for key, value in others:
                if (
                    isinstance(value, Tensor)
                    and value is not x
                    and value.dim()
                    and (value.shape[0] == batch and batch > 1)
                ):
                    reason = f"argument {key!r} has the batch dim"
                    break
        if reason is None:
            return True
        if not self._warned_rows and not torch.compiler.is_compiling():
            self._warned_rows = True
            warnings.warn(
                f"StochasticDepthLayer {self._name!r}: sample mode computes this layer on "
                f"every row and multiplies the dropped rows by 0 (no saving): {reason}",
                UserWarning,
                stacklevel=3,
            )
        return False

    def _kept_rows_forward(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        index: Tensor,
        scale: float | Tensor,
    ) -> Any:
        """The layer on the kept rows ``index`` only, added back into ``x``:
        ``y = x`` on dropped rows, ``x + scale * (f(x) - x)`` on kept ones."""
        assert self._structure is not None
        if index.shape[0] == 0 and may_skip_empty_branch():
            return self._structure.passthrough(x)
        xk = x.index_select(0, index)
        if args and args[0] is x:
            out = self.layer(xk, *args[1:], **kwargs)
        else:
            name = next(k for k in _HIDDEN_KWARGS if kwargs.get(k) is x)
            out = self.layer(*args, **{**kwargs, name: xk})
        h = first_output(out)
        if not isinstance(h, Tensor) or h.shape != xk.shape:
            raise shape_error("StochasticDepthLayer", self._name, xk.shape, out)
        assert isinstance(scale, float)
        return _with_first(out, x.index_add(0, index, h - xk, alpha=scale))
