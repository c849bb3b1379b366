"""Hugging Face ``Trainer``: gyro dropout as a callback.

Order of events in ``Trainer`` (transformers 4.4x and 5.x), and what the callback does:

1. ``Trainer.__init__`` ends with ``on_init_end``: the model's dropout layers are
   replaced here, so that
2. ``train(resume_from_checkpoint=...)`` loads the checkpoint's weights into a model
   that already has the gyro ``step``/``seed`` buffers (the weights are loaded before
   any training callback runs); then the optimizer is created, which the surgery does
   not affect (it adds buffers, no parameters);
3. ``on_train_begin`` (``state.max_steps`` known): ``total_steps`` of the layers it
   created; on resume, the per-module steps saved with the checkpoint (the callback's
   entry in ``trainer_state.json``) are applied: they agree with the loaded buffers,
   and they also cover a callback added after ``__init__`` (``trainer.add_callback``),
   whose surgery happens only now, after the weights were loaded;
4. ``on_step_end`` (once per optimizer step, after ``gradient_accumulation_steps``
   micro-batches): every gyrodrop module advances one step.

Needs ``transformers`` (``pip install 'gyrodrop[transformers]'``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gyrodrop.integrations import _common

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as e:
    raise ImportError(
        "gyrodrop.integrations.transformers needs transformers: "
        "pip install 'gyrodrop[transformers]'"
    ) from e

__all__ = ["GyroDropoutCallback"]


class GyroDropoutCallback(TrainerCallback, ExportableState):
    """Train a Hugging Face model with gyro dropout: surgery, schedule length, stepping
    and checkpoint state handled by the ``Trainer``.

    Args:
        p: drop probability of every replaced layer; ``None`` keeps each layer's own
            (the config's ``hidden_dropout_prob`` and so on).
        num_subnets: sigma, the number of pre-selected subnetworks per layer.
        subnets_per_step: tau, subnetworks trained at once.
        seed: seeds every layer (each layer derives its own seed from it).
        dims: non-batch dims a mask spans. Default ``(-1,)``: one mask per example over
            the hidden features, shared by all positions of a ``(B, T, H)`` sequence
            (so masks do not depend on the padded length); the same default as
            :func:`gyrodrop.apply_gyro_dropout` (``gyrodrop.surgery.SEQUENCE_DIMS``).
            ``None``: all dims.
        **kw: ``schedule``, ``scale``; ``total_steps`` or ``steps_per_set`` to fix the
            schedule yourself instead of taking ``state.max_steps``.

    Pass it at construction, ``Trainer(..., callbacks=[GyroDropoutCallback()])``, so the
    surgery happens in ``on_init_end``, before a checkpoint's weights are loaded. Every
    gyrodrop module of the model gets ``auto_step=False`` (this callback steps them).

    Note: models whose attention calls ``attention(..., dropout=self.dropout.p)``
    instead of the dropout module (BERT, Llama and most models with pluggable attention
    in transformers >= 4.48) keep ordinary dropout on the attention probabilities: the
    replaced module is never called. Hidden, embedding and classifier dropout are gyro.

    Resume: ``trainer.train(resume_from_checkpoint=...)`` continues the identical mask
    sequence: the ``step`` buffers are in the saved weights, and the callback's state
    (saved in ``trainer_state.json`` through ``ExportableState``) holds them as well.

    Example:
        >>> from gyrodrop.integrations.transformers import GyroDropoutCallback
        >>> callback = GyroDropoutCallback(num_subnets=64, subnets_per_step=8)
        >>> # trainer = transformers.Trainer(model, args, callbacks=[callback], ...)
    """

    def __init__(
        self,
        p: float | None = None,
        num_subnets: int = 256,
        subnets_per_step: int = 16,
        seed: int = 0,
        dims: int | tuple[int, ...] | list[int] | None = (-1,),
        **kw: Any,
    ) -> None:
        if isinstance(dims, list):  # from trainer_state.json
            dims = tuple(dims)
        self.options = _common.GyroOptions(
            type(self).__name__, p, num_subnets, subnets_per_step, seed, {"dims": dims, **kw}
        )
        self.replaced = 0
        self.total_steps: int | None = None
        self.global_step: int | None = None  # the trainer step the modules are at
        self._model: nn.Module | None = None

    def _apply(self, model: nn.Module | None) -> None:
        if model is not None:
            self._model = model
            self.replaced += _common.apply(model, self.options)

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._apply(model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        owner = type(self).__name__
        self._apply(model)  # replaces nothing if on_init_end did it
        if _common.set_total_steps(model, state.max_steps, owner):
            self.total_steps = int(state.max_steps)
        saved = self._saved_state(state)
        if state.global_step > 0 and saved is not None:
            if saved.get("global_step") != state.global_step:
                raise ValueError(
                    f"{owner}: the checkpoint's gyro state is from step "
                    f"{saved.get('global_step')} but the trainer resumes at step "
                    f"{state.global_step}"
                )
            _common.load_gyro_steps(model, saved.get("gyro_steps", {}), owner)
        self.global_step = state.global_step
        entries: Any = state.stateful_callbacks  # a dict once the Trainer set it up
        if isinstance(entries, dict):
            # A checkpoint saved without this callback has no entry for it, and the
            # Trainer's save would then fail on the missing key.
            entries.setdefault(type(self).__name__, self.state())

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            _common.advance(model)
            self.global_step = state.global_step

    # ------------------------------------------------------------------ state
    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """This callback's attributes as saved in the checkpoint's ``trainer_state.json``
        (present whether or not ``restore_callback_states_from_checkpoint`` is set)."""
        entries: Any = state.stateful_callbacks
        if not isinstance(entries, dict):
            return None
        entry = entries.get(type(self).__name__)
        if isinstance(entry, list):
            entry = entry[0] if entry else None
        if not isinstance(entry, dict):
            return None
        attributes = entry.get("attributes")
        return attributes if isinstance(attributes, dict) else None

    def state(self) -> dict[str, Any]:
        """``ExportableState``: constructor arguments, and the trainer step and
        per-module gyro steps at the time of the save (JSON-serializable; stored in
        ``trainer_state.json`` with every checkpoint)."""
        return {
            "args": self.options.as_args(),
            "attributes": {
                "total_steps": self.total_steps,
                "global_step": self.global_step,
                "gyro_steps": _common.gyro_steps(self._model),
            },
        }
