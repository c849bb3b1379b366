"""Gyro dropout surgery: every ``nn.Dropout`` (and channel-wise dropout) of a model
becomes a :class:`~gyrodrop.GyroDropout`, and back."""

from __future__ import annotations

import warnings
from typing import Any, Literal, cast

from torch import nn

from gyrodrop._modules import Policy, check_model, replace_modules, unwrap_model
from gyrodrop._validation import check_bool, check_choice, check_seed
from gyrodrop.blockwise import BlockGyroLinear
from gyrodrop.config import DropMode, GyroDropoutConfig
from gyrodrop.dropblock import DropBlock2d, DropBlock3d, GyroDropBlock2d, GyroDropBlock3d
from gyrodrop.gyro import GyroDropout
from gyrodrop.masks import layer_seed
from gyrodrop.stepping import detach_stepper
from gyrodrop.surgery.common import SurgeryWarning, one_schedule_warning, rewrite

__all__ = [
    "apply_gyro_dropout",
    "builtin_dropouts",
    "remove_gyro_dropout",
    "ORIGIN",
    "SEQUENCE_DIMS",
    "PAIRINGS",
    "LayerPairing",
]

#: Attribute a surgery function sets on a module it built: the type it replaced
#: (what :func:`remove_gyro_dropout` puts back).
ORIGIN = "_gyrodrop_replaced"

_CHANNELWISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

#: Default ``dims`` of the ``GyroDropout`` that replaces an ``nn.Dropout`` (in
#: :func:`apply_gyro_dropout` and the trainer callbacks): the last (feature) dim, so a
#: ``(B, T, F)`` sequence shares one mask per example across its positions.
SEQUENCE_DIMS: tuple[int, ...] = (-1,)
# Input dims of an unbatched input to each channel-wise dropout, as torch reads them:
# Dropout1d (C, L), Dropout3d (C, D, H, W). Dropout2d reads a 3-D input as (N, C, L)
# (batched, torch's behavior with its deprecation warning), so it has none.
_UNBATCHED_NDIM: dict[type, int | None] = {
    nn.Dropout1d: 2,
    nn.Dropout2d: None,
    nn.Dropout3d: 4,
}
DROPOUT_FAMILY = (nn.Dropout, *_CHANNELWISE, nn.AlphaDropout, nn.FeatureAlphaDropout)

#: How the layers' masks form subnetworks (``pairing`` of :func:`apply_gyro_dropout`).
LayerPairing = Literal["shared", "independent"]
#: ``pairing`` values of :func:`apply_gyro_dropout`.
PAIRINGS: tuple[LayerPairing, ...] = ("shared", "independent")


def apply_gyro_dropout(
    model: nn.Module,
    *,
    p: float | None = None,
    num_subnets: int = 256,
    subnets_per_step: int = 16,
    total_steps: int | None = None,
    steps_per_set: int | None = None,
    seed: int = 0,
    pairing: LayerPairing = "shared",
    drop_mode: DropMode = "standard",
    drop_cutoff: float | None = None,
    **kw: Any,
) -> int:
    """Replace ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` in ``model`` with
    :class:`~gyrodrop.GyroDropout`, in place.

    ``nn.Dropout`` becomes ``GyroDropout(dims=(-1,))`` unless ``dims`` is given: one
    mask per example over the last (feature) dim, shared by every other dim, so a
    ``(B, T, F)`` sequence gets the same subnetwork mask at every position and the masks
    do not depend on the padded length ``T`` (for ``(B, F)`` inputs this is exactly
    ``GyroDropout``'s own default mask; pass ``dims=None`` for masks over all non-batch
    dims). The trainer callbacks use the same default.
    ``Dropout1d/2d/3d`` become channel-wise masks (``dims=(1,)``); unbatched inputs keep
    torch's meaning (``Dropout1d``: ``(C, L)``, ``Dropout3d``: ``(C, D, H, W)``, whole
    channels; ``Dropout2d`` reads a 3-D input as ``(N, C, L)``, as torch does).
    ``p=None`` keeps each
    layer's own ``p``. Every layer gets its own mask seed derived from ``seed`` and its
    position, and all share the schedule seed ``seed``, so subnetwork ``k`` of the
    model (mask ``k`` in every layer) is trained as one network, as in the paper.
    Layers already replaced are left alone. Other keyword arguments (``schedule``,
    ``scale``, ``dims``, ``auto_step``) go to every ``GyroDropout``.

    Stepping: with ``auto_step=True`` (default) ``model`` gets one model-level stepper
    (:func:`gyrodrop.schedule.attach_stepper`, shared by every ``apply_*``): after each
    training-mode forward of ``model`` every gyrodrop layer in it advances exactly one
    step, whether it was called 0, 1 or many times, and a recompute by activation
    checkpointing replays the same masks. Call the model you passed here (not a
    sub-module) to train; for gradient accumulation use
    :func:`gyrodrop.bind_to_optimizer`. ``auto_step=False``: call
    :func:`gyrodrop.step` yourself.

    ``pairing`` says how the layers' masks form subnetworks:

    - ``"shared"`` (default): one schedule for the whole network (schedule seed
      ``seed`` in every layer), so the active ids are the same in every layer;
    - ``"independent"``: every layer gets its own schedule seed, so each layer picks its
      active masks independently of the others; the schedule defaults to
      ``"replacement"`` (ids drawn with replacement, as the authors' TensorFlow code
      does) unless ``schedule`` is given. The model then trains no fixed set of
      network-level subnetworks.

    ``drop_mode="early"`` or ``"late"`` with ``drop_cutoff`` (a fraction of
    ``total_steps`` in ``(0, 1)``) makes every layer drop only before or only after the
    cutoff step (early and late dropout, Liu et al., ICML 2023).

    Returns the number of layers replaced, and warns when it is zero. All-or-nothing:
    when any layer is refused (``p=1.0``, say) the model is left unchanged. Dropout built
    into other modules (``nn.LSTM(dropout=p)``, ``nn.MultiheadAttention(dropout=p)``,
    e.g. inside ``nn.TransformerEncoderLayer``) cannot be swapped: it is left alone and
    named in a warning (see :func:`builtin_dropouts`).

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        >>> gyrodrop.apply_gyro_dropout(model, total_steps=100, num_subnets=16, subnets_per_step=4)
        1
        >>> model[1].p
        0.3
    """
    owner = "apply_gyro_dropout"
    check_model(owner, model)
    check_seed(owner, seed)
    check_choice(owner, "pairing", pairing, PAIRINGS)
    if pairing == "independent":
        kw.setdefault("schedule", "replacement")
    auto_step = check_bool(owner, "auto_step", kw.pop("auto_step", True))
    allowed = {"dims", "schedule", "scale"}
    if set(kw) - allowed:
        raise TypeError(
            f"{owner}: unexpected keyword arguments {sorted(set(kw) - allowed)}; "
            f"allowed: {sorted(allowed | {'auto_step'})} besides the named ones"
        )
    with one_schedule_warning(owner, total_steps, steps_per_set):
        config = GyroDropoutConfig(
            p=0.5 if p is None else p,
            num_subnets=num_subnets,
            subnets_per_step=subnets_per_step,
            total_steps=total_steps,
            steps_per_set=steps_per_set,  # type: ignore[arg-type]  # None: derived
            drop_mode=drop_mode,
            drop_cutoff=drop_cutoff,
            owner=owner,
            **kw,
        )

    def make(module: nn.Module, index: int) -> nn.Module:
        layer: dict[str, Any] = {} if p is not None else {"p": module.p}
        if "dims" not in kw:
            channelwise = isinstance(module, _CHANNELWISE)
            layer["dims"] = (1,) if channelwise else SEQUENCE_DIMS
        dims = layer.get("dims", config.dims)
        if isinstance(module, _CHANNELWISE) and dims == (1,):
            layer["unbatched_ndim"] = _UNBATCHED_NDIM[type(module)]
        new = GyroDropout.from_config(
            config.replace(owner=owner, **layer),
            seed=layer_seed(seed, index),
            schedule_seed=seed if pairing == "shared" else layer_seed(seed, index),
            auto_step=auto_step,
            total_steps=total_steps,
        )
        object.__setattr__(new, ORIGIN, type(module))  # what remove_gyro_dropout restores
        return new

    policy: Policy = dict.fromkeys((nn.Dropout, *_CHANNELWISE), make)
    count = rewrite(
        owner,
        model,
        policy,
        auto_step=auto_step,
        nothing="no nn.Dropout / Dropout1d/2d/3d layer found; the model is unchanged",
    )
    builtin = builtin_dropouts(model)
    if builtin:
        warnings.warn(
            "apply_gyro_dropout: left alone (their dropout is built into the module, not a "
            "Dropout layer): " + ", ".join(builtin),
            SurgeryWarning,
            stacklevel=2,
        )
    return count


def builtin_dropouts(model: nn.Module) -> list[str]:
    """Modules whose dropout is an argument, not a child ``nn.Dropout``, so surgery
    cannot swap it: ``nn.LSTM``/``GRU``/``RNN(dropout=p)`` (between stacked layers) and
    ``nn.MultiheadAttention(dropout=p)`` (on the attention weights, inside
    ``F.multi_head_attention_forward``), as ``"name (Type, dropout=p)"``."""
    found = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and float(m.dropout) > 0:
            found.append(f"{name or '<root>'} ({type(m).__name__}, dropout={m.dropout})")
    return found


def _plain_type(module: nn.Module) -> type[nn.Module]:
    origin = getattr(module, ORIGIN, None)
    if isinstance(origin, type) and issubclass(origin, nn.Module):
        return origin
    if isinstance(module, (DropBlock3d, GyroDropBlock3d)):
        return nn.Dropout3d
    if isinstance(module, (DropBlock2d, GyroDropBlock2d)):
        return nn.Dropout2d
    if isinstance(module, GyroDropout) and module.dims == (1,):
        return nn.Dropout2d  # channel-wise; all of Dropout1d/2d/3d are eval identities
    return nn.Dropout


def remove_gyro_dropout(model: nn.Module) -> int:
    """Undo the dropout surgeries, in place, e.g. to export a trained model.

    - :class:`~gyrodrop.GyroDropout` becomes ``nn.Dropout(p)``, or the
      ``Dropout1d/2d/3d`` it replaced when :func:`gyrodrop.apply_gyro_dropout` made it
      channel-wise (``dims=(1,)``; ``Dropout2d`` when the original type is unknown);
    - :class:`~gyrodrop.DropBlock2d` and :class:`~gyrodrop.GyroDropBlock2d` become
      ``nn.Dropout2d(p)``, their 3-d versions ``nn.Dropout3d(p)``;
    - :class:`~gyrodrop.BlockGyroLinear` becomes an ``nn.Linear`` sharing its weight
      and bias (the fused dropout stays the ``nn.Identity`` that
      :func:`gyrodrop.apply_block_gyro` left in its place).

    The gyrodrop layers' ``step``/``seed`` buffers go away, so ``state_dict()`` has the
    keys of the model before surgery; ``eval()`` outputs are unchanged. Once no
    gyrodrop layer is left, the model-level stepper goes too: the model has exactly the
    hooks it had before surgery (so it scripts, traces and compiles as before). Stochastic depth
    is undone by :func:`gyrodrop.surgery.remove_stochastic_depth`.

    Returns the number of layers replaced (0 without a warning: nothing to undo).

    Example:
        >>> import torch.nn as nn, gyrodrop
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        >>> keys = list(net.state_dict())
        >>> gyrodrop.apply_gyro_dropout(net, total_steps=100, num_subnets=8, subnets_per_step=2)
        1
        >>> gyrodrop.remove_gyro_dropout(net)
        1
        >>> net[1], list(net.state_dict()) == keys
        (Dropout(p=0.3, inplace=False), True)
    """
    unwrap_model(model)

    def plain(module: nn.Module, _: int) -> nn.Module:
        if isinstance(module, BlockGyroLinear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device="meta",
            )
            linear.weight = module.weight
            if module.bias is not None:
                linear.bias = cast(nn.Parameter, module.bias)
            return linear
        return _plain_type(module)(p=cast(float, module.p))

    policy: Policy = dict.fromkeys(
        (
            GyroDropout,
            DropBlock2d,
            GyroDropBlock2d,
            DropBlock3d,
            GyroDropBlock3d,
            BlockGyroLinear,
        ),
        plain,
    )
    count = replace_modules(model, policy)
    detach_stepper(model)  # the model's hooks as before surgery, once nothing is stepped
    return count
