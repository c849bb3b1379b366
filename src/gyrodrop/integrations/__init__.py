"""Trainer integrations, imported on demand so ``import gyrodrop`` needs neither trainer.

- :mod:`gyrodrop.integrations.lightning`: ``GyroDropoutCallback`` for PyTorch Lightning
  (``pip install 'gyrodrop[lightning]'``).
- :mod:`gyrodrop.integrations.transformers`: ``GyroDropoutCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'gyrodrop[transformers]'``).

Both rewrite the model's dropout layers before a checkpoint's weights are loaded, take
``total_steps`` from the trainer's number of optimizer steps, advance the schedule once
per optimizer step (gradient accumulation included) and save the schedule state with
checkpoints, so a resumed run continues the identical mask sequence.
"""
