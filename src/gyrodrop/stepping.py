"""Who advances the step: the stepped base module and the model-level stepper.

The ``step`` buffer of every gyrodrop module (:class:`SteppedModule`) counts completed
training steps and the next training forward uses the masks of ``step``. A model
rewritten by the ``apply_*`` surgery functions carries one model-level stepper
(:func:`attach_stepper`): after each training-mode forward of the model every gyrodrop
module inside advances by one, however often each was called (0, 1 or many times), so
all calls of one forward share the masks. :func:`gyrodrop.bind_to_optimizer` moves that step to
``optimizer.step()`` (gradient accumulation); :func:`gyrodrop.set_stepping` switches between the
rules; a layer outside such a model steps on each of its own training calls. A forward
that runs while autograd executes a backward (activation-checkpoint recompute) replays
the step of the layer's last training forward and never advances.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from gyrodrop._guards import (
    EXPORT_HINT,
    check_input,
    check_step,
    has_meta_tensor,
    in_backward,
    refuse_bad_counters,
    refuse_export,
)
from gyrodrop._modules import unwrap_model
from gyrodrop._validation import MAX_STEP, check_bool, check_seed, check_step_count
from gyrodrop.config import LayerConfig, config_properties, warmup_rate

__all__ = [
    "SteppedModule",
    "attach_stepper",
    "detach_stepper",
    "refuse_export",
    "check_input",
    "in_backward",
    "TRAINER_SCHEDULED",
    "warmup_rate",
]

#: Attribute set (to ``True``) on modules whose ``steps_per_set`` a trainer callback sets
#: after a checkpoint is loaded (:mod:`gyrodrop.integrations`): their checkpoint check
#: skips ``steps_per_set``.
TRAINER_SCHEDULED = "_gyrodrop_trainer_scheduled"


_COUNTER_BUFFERS = ("step", "seed", "schedule_seed")


class _ModelStepper:
    """The model-level stepper (:func:`attach_stepper`), kept on the model's root module
    as ``_gyrodrop_stepper`` and referenced by the modules it advances. ``when`` is
    ``"forward"`` (after each training forward of the root) or ``"optimizer"`` (after
    each ``optimizer.step()``, :func:`gyrodrop.bind_to_optimizer`)."""

    def __init__(self) -> None:
        self.when = "forward"
        self.in_forward = False  # between the root's forward pre-hook and post-hook
        self.used = False  # a module it owns ran a training forward in this root forward
        self.advanced = False  # a compiled forward advanced at its start (pre-hook)
        self.warned = False
        self.optimizer_hook: Any = None  # RemovableHandle of the optimizer's post-hook

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the model is not bound to the original's optimizer.
        state = dict(self.__dict__)
        state["optimizer_hook"] = None
        state["in_forward"] = False
        state["used"] = False
        state["advanced"] = False
        return state

    def advance(self, root: nn.Module) -> None:
        """Advance by one every module of ``root`` that this stepper owns."""
        for module in root.modules():
            if isinstance(module, SteppedModule) and module._stepper is self and module.auto_step:
                module.advance()

    def outside_forward(self, module: SteppedModule) -> None:
        """A module it owns ran a training forward outside the root's forward."""
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{type(module).__name__}: a training forward ran outside the forward of "
                "the model gyrodrop steps with (the module given to apply_*): such calls "
                "advance their own layer's step on every call. Hint: apply gyrodrop to the "
                "module you call, or gyrodrop.bind_to_optimizer(model, optimizer)",
                UserWarning,
                stacklevel=4,
            )


def _compiled_pre_step(root: nn.Module, stepper: _ModelStepper, args: tuple[Any, ...]) -> None:
    """The model-level step of a compiled forward, taken at its start: every owned
    module's step is copied (``_step_snapshot``: what its layers read) and then the
    buffers advance. Taking it here, not in the post-hook, keeps the in-place advance out
    of the forward graph, so an activation-checkpointed region (whose recompute reads
    the saved step) never sees its input move; and a compiled user model then makes two
    graphs at most (this hook's, the forward's): the post-hook does no tensor work.
    Unlike eager mode, a compiled forward that raises has advanced the step."""
    owned = [
        m
        for m in root.modules()
        if isinstance(m, SteppedModule) and m._stepper is stepper and m.auto_step
    ]
    for m in owned:
        m.__dict__["_step_snapshot"] = m.step.clone()
    if (
        stepper.when == "forward"
        # a training forward, or one that runs gyrodrop layers in training mode (MC
        # dropout on a model in eval with its dropouts switched on)
        and (root.training or any(m.training for m in owned))
        and not has_meta_tensor(args, {})  # shape inference, not a training step
    ):
        for m in owned:
            if not m.step.is_meta:
                m.step.add_(1)  # a buffer: never requires grad
        stepper.advanced = True


def _root_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    stepper = module.__dict__.get("_gyrodrop_stepper")
    if isinstance(stepper, _ModelStepper):
        stepper.in_forward = True
        stepper.used = False
        stepper.advanced = False
        if torch.compiler.is_compiling():
            _compiled_pre_step(module, stepper, args)


def _root_post_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> None:
    stepper = module.__dict__.get("_gyrodrop_stepper")
    if not isinstance(stepper, _ModelStepper):
        return
    stepper.in_forward = False
    if getattr(stepper, "advanced", False):  # a compiled forward: stepped at its start
        stepper.advanced = False
        for m in module.modules():
            m.__dict__.pop("_step_snapshot", None)
        return
    if (
        stepper.when == "forward"
        # a training forward of the model, or one that ran gyrodrop layers in training
        # mode (say MC dropout on a model in eval with its dropouts switched on)
        and (module.training or stepper.used)
        and output is not None  # None: the forward raised (the hook is always called)
        and not in_backward()  # an activation-checkpoint recompute of the whole model
        and not has_meta_tensor(args, kwargs)  # shape inference, not a training step
    ):
        stepper.advance(module)


def attach_stepper(model: nn.Module) -> None:
    """Give ``model`` (DDP / ``torch.compile`` wrappers looked through) its model-level
    stepper, once, and hand it every gyrodrop module inside with ``auto_step=True``.

    From then on those modules do not step on their own calls; the stepper advances
    each of them by exactly one after every training-mode forward of ``model`` (or after
    every ``optimizer.step()`` once :func:`gyrodrop.bind_to_optimizer` was called). What the
    ``apply_*`` surgery functions call; a second call (another ``apply_*``) only hands
    over the new modules. Modules with ``auto_step=False`` stay with
    :func:`gyrodrop.step`.
    """
    root = _unwrap("attach_stepper", model)
    stepper = root.__dict__.get("_gyrodrop_stepper")
    if not isinstance(stepper, _ModelStepper):
        stepper = _ModelStepper()
        root.__dict__["_gyrodrop_stepper"] = stepper
    if _root_post_hook not in root._forward_hooks.values():
        root.register_forward_pre_hook(_root_pre_hook)
        root.register_forward_hook(_root_post_hook, with_kwargs=True, always_call=True)
    for module in root.modules():
        if isinstance(module, SteppedModule) and module.auto_step:
            module._stepper = stepper


def detach_stepper(model: nn.Module) -> bool:
    """Take the model-level stepper (hooks, optimizer hook) off ``model`` once no module
    inside is stepped by it, so it has the hooks it had before :func:`attach_stepper`
    (what undo calls). Returns whether it was taken off."""
    root = _unwrap("detach_stepper", model)
    stepper = root.__dict__.get("_gyrodrop_stepper")
    if not isinstance(stepper, _ModelStepper):
        return False
    if any(isinstance(m, SteppedModule) and m._stepper is stepper for m in root.modules()):
        return False
    if stepper.optimizer_hook is not None:
        stepper.optimizer_hook.remove()
        stepper.optimizer_hook = None
    hooks = (
        (root._forward_pre_hooks, _root_pre_hook),
        (root._forward_hooks, _root_post_hook),
    )
    for registry, fn in hooks:
        for key in [k for k, hook in registry.items() if hook is fn]:
            # what RemovableHandle.remove() does, for handles not kept (copies, pickles)
            del registry[key]
            root._forward_pre_hooks_with_kwargs.pop(key, None)
            root._forward_hooks_with_kwargs.pop(key, None)
            root._forward_hooks_always_called.pop(key, None)
    del root.__dict__["_gyrodrop_stepper"]
    return True


def _unwrap(owner: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: expected an nn.Module as model, got {type(model).__name__}")
    return unwrap_model(model)


class SteppedModule(nn.Module):
    """Base of every gyrodrop module whose randomness follows a step counter.

    Holds the ``step`` and ``seed`` buffers (so ``state_dict`` resumes exactly) and the
    stepping rule. ``step`` counts completed training steps; a training forward uses
    the masks of ``step`` (:meth:`forward_step`). Who advances it:

    - ``auto_step=True`` inside a model rewritten by an ``apply_*`` function (or given
      to :func:`attach_stepper` / :func:`gyrodrop.set_stepping` /
      :func:`gyrodrop.bind_to_optimizer`):
      the model-level stepper, once per training forward of the model (or per
      optimizer step);
    - ``auto_step=True`` on its own: each training call of the layer;
    - ``auto_step=False``: only :func:`gyrodrop.step`.

    A forward run by autograd during a backward (activation-checkpoint recompute)
    replays the step of the layer's last training forward and never advances.

    The hyperparameters that shape the masks are one frozen, checked ``config``
    (:mod:`gyrodrop.config`); :meth:`hparams`, ``extra_repr`` and the saved settings
    (``_extra_state`` in ``state_dict``) are derived from it, and loading a checkpoint
    saved with other values warns, naming each.

    The buffers move with the module (to an accelerator too); host-side copies of their
    values avoid one device synchronization per layer per step. A copy is trusted only
    while the buffer is the same tensor at the same version: any in-place write
    (``load_state_dict``, :func:`gyrodrop.step`, a DDP buffer broadcast) bumps the
    version and the value is read again.
    """

    step: Tensor
    seed: Tensor
    config: LayerConfig = LayerConfig()  # subclasses set their own in __init__
    #: The type of ``config``; a subclass that names its own gets a property per field
    #: (``layer.p`` reads ``layer.config.p``).
    config_class: type[LayerConfig] = LayerConfig
    # Class-level defaults: modules pickled by 0.1.0 have no such attributes.
    _initial_counters: dict[str, int] = {}  # noqa: RUF012 - read only; set per instance
    _stepper: _ModelStepper | None = None
    _replay_step: int | None = None  # the step of the last training forward (a cache)
    _loading_prefix: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            for name, prop in config_properties(cls.config_class).items():
                if not isinstance(cls.__dict__.get(name, prop), property):
                    raise TypeError(f"{cls.__name__}.{name} hides a field of {cls.config_class}")
                setattr(cls, name, cls.__dict__.get(name, prop))

    def __init__(self, *, seed: int, auto_step: bool, owner: str) -> None:
        super().__init__()
        self._initial_counters: dict[str, int] = {}
        self.register_counter("step", 0)
        self.register_counter("seed", check_seed(owner, seed))
        check_bool(owner, "auto_step", auto_step)
        self.auto_step = auto_step
        self._mirrors: dict[str, tuple[Tensor, int, int]] = {}

    def register_counter(self, name: str, value: int) -> None:
        """Register the int64 scalar buffer ``name`` holding ``value``, the value
        :meth:`reset_parameters` puts back (``step``, ``seed``, ``schedule_seed``)."""
        self.register_buffer(name, torch.tensor(value, dtype=torch.int64))
        self._initial_counters[name] = value

    def reset_parameters(self) -> None:
        """Put ``step``, ``seed`` (and ``schedule_seed``) back to their construction
        values, in place: after ``to_empty()`` of a model built on ``meta`` (FSDP), every
        rank then holds what a construction on the device holds (and draws its masks)."""
        for name, value in self._initial_counters.items():
            buffer: Tensor = getattr(self, name)
            if not buffer.is_meta:
                with torch.no_grad():
                    buffer.fill_(value)
        self._replay_step = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        was_meta = self.step.is_meta  # to_empty() of a module built on meta: values back
        out = super()._apply(fn, recurse)
        if was_meta and not self.step.is_meta:
            SteppedModule.reset_parameters(self)  # the counters only, not a subclass's
        return out

    def _host(self, name: str) -> int:
        """The value of the scalar buffer ``name`` as a Python int, cached on the host."""
        t: Tensor = self._buffers[name]  # type: ignore[assignment]  # not the slow getattr
        if t.is_meta:
            return 0  # a module on the meta device has shapes, not values
        try:
            version = t._version
        except RuntimeError:  # inference tensors track no version
            return int(t)
        cached = self._mirrors.get(name)
        if cached is not None and cached[0] is t and cached[1] == version:
            return cached[2]
        value = int(t)
        self._mirrors[name] = (t, version, value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) gets fresh tensors whose version restarts at 0:
        # cached host values must not travel with it.
        state = dict(self.__dict__)
        state["_mirrors"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A module pickled before configs held its settings as attributes.
        if "config" not in state and type(self).config_class is not LayerConfig:
            names = {f.name for f in dataclasses.fields(self.config_class)}
            settings = {name: state.pop(name) for name in list(state) if name in names}
            state["config"] = self.config_class(**settings, owner=type(self).__name__)
        super().__setstate__(state)

    def advance(self, n: int = 1) -> None:
        """Advance the step counter by ``n >= 0`` (what :func:`gyrodrop.step` calls)."""
        if n.__class__ is not int or n < 0 or n > MAX_STEP:
            check_step_count(type(self).__name__ + ".advance", "n", n)
        step: Tensor = self._buffers["step"]  # type: ignore[assignment]
        if step.is_meta:
            return
        if torch.compiler.is_compiling():  # in the graph: no host copy to keep
            self.step.add_(n)
            return
        value = self.current_step()
        step.add_(n)  # a buffer: never requires grad
        try:
            self._mirrors["step"] = (step, step._version, value + n)
        except RuntimeError:
            self._mirrors.pop("step", None)

    @torch.no_grad()
    def set_step(self, value: int) -> None:
        """Set the step counter to ``value >= 0`` (resuming from a trainer's saved
        state; the ``step`` buffer is written in place, so it stays the same tensor)."""
        check_step_count(type(self).__name__ + ".set_step", "value", value)
        self.step.fill_(value)

    def current_step(self) -> int:
        """The step counter as a Python int."""
        return self._host("step")

    def _step_arg(self, step: Any, method: str) -> Any:
        """``step`` given to ``method`` checked (:func:`check_step`); None: the current."""
        return self.current_step() if step is None else check_step(self, method, step)

    @torch.compiler.disable
    def forward_step(self) -> int:
        """The step whose masks this training forward uses; call once per training
        forward, before drawing masks (every gyrodrop layer's forward does).

        Returns ``step`` and, for a layer that steps on its own calls, advances it. A
        forward run while autograd executes a backward (activation-checkpoint
        recompute) gets the step of this layer's last training forward instead and
        advances nothing, so the recompute builds the same masks and graph. (So run
        each backward before the next training forward that steps, as training loops
        do; with several forwards per backward use :func:`gyrodrop.bind_to_optimizer`.)
        Runs eagerly under ``torch.compile``.
        """
        return self._forward_step()

    def _forward_step(self) -> int:
        """:meth:`forward_step` for callers that already run eagerly (a method of the
        layer under ``torch.compiler.disable``): one wrapper less per forward."""
        refuse_export(type(self).__name__)
        if in_backward():
            replay = self._replay_step
            return self.current_step() if replay is None else replay
        snapshot = self.__dict__.get("_step_snapshot")
        stepper = self._stepper
        if snapshot is not None and stepper is not None and stepper.in_forward:
            # a compiled model advanced at its start: this forward's step is the copy
            # (an eager piece of it, e.g. a block-mode decision behind a graph break)
            step = int(snapshot)
            self.__dict__["_replay_step"] = step
            return step
        step = self.current_step()
        self.__dict__["_replay_step"] = step  # not nn.Module.__setattr__: per forward
        if self.auto_step:
            if stepper is None:
                self.advance()
            elif stepper.in_forward:
                stepper.used = True
            elif stepper.when == "forward":
                stepper.outside_forward(self)
                self.advance()
        return step

    def forward_step_tensor(self) -> Tensor:
        """:meth:`forward_step` for the compiled training path: the step whose masks
        this training forward uses, as a 0-d int64 tensor on the buffers' device, and,
        for a layer that steps on its own calls, the buffer advanced in place. Tensor
        ops only, so ``torch.compile`` traces it into the graph: the masks are computed
        from the step inside the graph (no recompile per step, no graph break).

        An activation-checkpoint recompute inside a compiled graph is the graph's own
        recompute of the saved step (nothing to replay); a compiled module called again
        by a checkpoint outside the graph is not told apart (run the checkpoint inside
        the compiled model).
        """
        refuse_export(type(self).__name__)
        step = self.step
        if self.auto_step:
            stepper = self._stepper
            snapshot = self.__dict__.get("_step_snapshot")
            if stepper is not None and stepper.in_forward and snapshot is not None:
                return snapshot
            if stepper is None or (not stepper.in_forward and stepper.when == "forward"):
                step = step.clone()
                self.step.add_(1)  # a buffer: never requires grad
            # inside the model's forward: the root's post-hook advances (no flag set
            # here: a checkpointed region may not mutate outer state; see the hook)
        return step

    @classmethod
    def from_config(cls, config: LayerConfig, *args: Any, **kwargs: Any) -> Any:
        """The layer for ``config`` (a :attr:`config_class`); ``args`` and ``kwargs`` are
        the constructor's other arguments (``seed``, ``auto_step``, a Linear's
        features, ...)."""
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__}.from_config: config must be a {cls.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        return cls(*args, **config.hparams(), **kwargs)

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters that shape this layer's masks (JSON types), saved with
        its state: the fields of its ``config``."""
        return self.config.hparams()

    def extra_repr(self) -> str:
        return self.config.describe()

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` asks this first: refused with what to do instead (the
        masks follow a step counter kept in Python, which TorchScript cannot run)."""
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script cannot compile gyrodrop layers (their "
            f"masks follow a step counter kept in Python). Hint: {EXPORT_HINT}"
        )

    def get_extra_state(self) -> Tensor:
        """:meth:`hparams` as UTF-8 JSON in a uint8 tensor (a tensor, so safetensors
        and ``torch.load(weights_only=True)`` keep it)."""
        data = json.dumps(self.hparams(), sort_keys=True).encode()
        return torch.tensor(list(data), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Warn when the checkpoint's hyperparameters differ from this layer's (the
        layer keeps its own; the loaded step and seed then continue another
        sequence of masks)."""
        try:
            if isinstance(state, Tensor):
                state = json.loads(bytes(state.detach().cpu().tolist()).decode())
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict):
            return
        current = json.loads(json.dumps(self.hparams()))
        if getattr(self, TRAINER_SCHEDULED, False):
            current.pop("steps_per_set", None)  # a trainer callback sets it after loading
        diffs = [
            f"{key}={state[key]!r} (this layer: {value!r})"
            for key, value in current.items()
            if key in state and state[key] != value
        ]
        if diffs:
            name = self._loading_prefix.rstrip(".")
            where = f" {name!r}" if name else ""
            warnings.warn(
                f"{type(self).__name__}{where}: the checkpoint was saved with "
                + ", ".join(diffs)
                + "; this layer keeps its own settings, so from here on its masks differ "
                "from the saved run's. Hint: build the layer with the saved settings",
                UserWarning,
                stacklevel=2,
            )

    def current_seed(self) -> int:
        """The seed as a Python int."""
        return self._host("seed")

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        refuse_bad_counters(type(self).__name__, _COUNTER_BUFFERS, state_dict, prefix, error_msgs)
        # A checkpoint saved before surgery (plain nn.Dropout) has no step/seed, one from
        # before schedule seeds no schedule_seed: keep the module's own values.
        absent = [n for n in (*_COUNTER_BUFFERS, "_extra_state") if prefix + n not in state_dict]
        self._loading_prefix = prefix
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
