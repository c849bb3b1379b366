"""PyTorch Lightning: gyro dropout as a callback.

``GyroDropoutCallback`` rewrites the LightningModule's dropout layers at ``setup`` (so a
checkpoint's ``step``/``seed`` buffers have somewhere to go when Lightning restores the
weights right after), sets the schedule's ``total_steps`` from
``trainer.estimated_stepping_batches`` before the first batch, and advances the schedule
once per optimizer step (it follows ``trainer.global_step``, so gradient accumulation,
several optimizers and manual optimization all count what the trainer counts).

Needs ``lightning`` (``pip install 'gyrodrop[lightning]'``); the standalone
``pytorch_lightning`` package works too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gyrodrop.integrations import _common

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same library
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "gyrodrop.integrations.lightning needs PyTorch Lightning: "
            "pip install 'gyrodrop[lightning]'"
        ) from e

__all__ = ["GyroDropoutCallback"]


class GyroDropoutCallback(pl.Callback):
    """Train a LightningModule with gyro dropout: surgery, schedule length, stepping and
    checkpoint state handled by the trainer.

    Args:
        p: drop probability of every replaced layer; ``None`` keeps each layer's own.
        num_subnets: sigma, the number of pre-selected subnetworks per layer.
        subnets_per_step: tau, subnetworks trained at once.
        seed: seeds every layer (each layer derives its own seed from it).
        **kw: ``dims``, ``schedule``, ``scale`` for every :class:`~gyrodrop.GyroDropout`;
            ``total_steps`` or ``steps_per_set`` to fix the schedule yourself instead of
            taking the trainer's number of optimizer steps.

    What happens when:

    - ``setup`` (every stage, before Lightning loads a checkpoint's weights):
      :func:`gyrodrop.apply_gyro_dropout` replaces ``nn.Dropout``/``Dropout1d/2d/3d``;
      every gyrodrop module of the model, new or already there, gets
      ``auto_step=False``, because this callback steps them.
    - ``on_train_start``: ``total_steps = trainer.estimated_stepping_batches`` for the
      layers it created (a resumed run gets the same value as the uninterrupted one).
    - ``on_train_batch_end``: advances every gyrodrop module by the number of optimizer
      steps taken since the last call (``trainer.global_step``), so under
      ``accumulate_grad_batches=k`` the masks change once per ``k`` batches.

    Resume: the schedule state lives in the modules' ``step``/``seed`` buffers, which
    are in the checkpoint's ``state_dict``; the callback's own :meth:`state_dict` keeps
    the per-module steps too, and they are applied at ``on_train_start`` (they agree
    unless the weights were loaded without the buffers), so ``fit(ckpt_path=...)``
    continues the identical mask sequence. Lightning runs checkpoint callbacks after
    the others, so a checkpoint taken on a batch end already has the advanced step.
    Outside the Trainer, a plain module loads such a checkpoint with
    ``Module.load_from_checkpoint(path, strict=False)`` (the gyro buffers are then
    ignored; gyro layers are the identity in eval) or after ``apply_gyro_dropout``.

    Example:
        >>> from gyrodrop.integrations.lightning import GyroDropoutCallback
        >>> callback = GyroDropoutCallback(num_subnets=64, subnets_per_step=8)
        >>> # trainer = lightning.pytorch.Trainer(callbacks=[callback], ...)
    """

    def __init__(
        self,
        p: float | None = None,
        num_subnets: int = 256,
        subnets_per_step: int = 16,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__()
        self.options = _common.GyroOptions(
            type(self).__name__, p, num_subnets, subnets_per_step, seed, kw
        )
        self.replaced = 0
        self.total_steps: int | None = None
        self._module: nn.Module | None = None
        self._seen_global_step: int | None = None
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------ surgery
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module
        self.replaced += _common.apply(pl_module, self.options)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Layers built in `configure_model` (after `setup`) exist only now.
        self.replaced += _common.apply(pl_module, self.options)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        total = trainer.estimated_stepping_batches
        if _common.set_total_steps(pl_module, total, owner):
            self.total_steps = int(total)
        if self._restored is not None:
            saved = self._restored.get("gyro_steps") or {}
            if saved and saved != _common.gyro_steps(pl_module):
                _common.load_gyro_steps(pl_module, saved, owner)
            self._restored = None
        self._seen_global_step = trainer.global_step

    # ------------------------------------------------------------------ stepping
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._seen_global_step is None:
            self._seen_global_step = trainer.global_step
            return
        taken = trainer.global_step - self._seen_global_step
        if taken > 0:
            _common.advance(pl_module, taken)
            self._seen_global_step = trainer.global_step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The callback's bookkeeping: options, ``total_steps``, the trainer step it
        last followed and every gyrodrop module's step."""
        return {
            "args": self.options.as_args(),
            "total_steps": self.total_steps,
            "global_step": self._seen_global_step,
            "gyro_steps": _common.gyro_steps(self._module),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's bookkeeping; the steps are applied at ``on_train_start``."""
        self._restored = dict(state_dict)
        self.total_steps = state_dict.get("total_steps", self.total_steps)
