"""GyroDropoutCallback for the Hugging Face Trainer on a tiny randomly initialised BERT
(no downloads): surgery before checkpoint loading, one step per optimizer step under
gradient accumulation, resume from a checkpoint continuing the identical masks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import gyrodrop

transformers = pytest.importorskip("transformers")  # CI installs the [transformers] extra

from gyrodrop.integrations.transformers import GyroDropoutCallback  # noqa: E402

ROWS, SEQ, BATCH, ACCUMULATE = 16, 8, 4, 2  # 4 micro-batches, 2 optimizer steps per epoch
SIGMA, TAU = 8, 2


class Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 100, (ROWS, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (ROWS,), generator=g)

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.int64),
            "labels": self.labels[i],
        }


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.0,  # applied functionally from .p, not by the module
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def make_trainer(model, out, max_steps: int, callbacks=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=kw.pop("save_steps", 1000),
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def train(trainer, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kw)


def gyro_layers(model: nn.Module) -> dict[str, gyrodrop.GyroDropout]:
    return {n: m for n, m in model.named_modules() if isinstance(m, gyrodrop.GyroDropout)}


def record_steps(model: nn.Module) -> list[int]:
    """Gyro step of the embedding dropout at every training forward."""
    seen: list[int] = []
    layer = model.bert.embeddings.dropout

    def hook(module, inputs):
        if module.training:
            seen.append(int(module.step))

    layer.register_forward_pre_hook(hook)
    return seen


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class TestGyroDropoutCallbackSurgery:
    def test_init_end_replaces_dropout_before_training(self, tmp_path):
        model = tiny_bert()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        make_trainer(model, tmp_path, 4, [callback])
        layers = gyro_layers(model)
        # embeddings, 2 x (attention self, attention output, layer output), classifier
        assert callback.replaced == len(layers) == 8
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
        assert all(m.dims == (-1,) and not m.auto_step for m in layers.values())
        assert model.classifier  # the model is still the user's object

    def test_callback_and_apply_gyro_dropout_agree_on_the_sequence_mask_layout(self, tmp_path):
        by_callback, by_surgery = tiny_bert(), tiny_bert()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        make_trainer(by_callback, tmp_path, 4, [callback])
        gyrodrop.apply_gyro_dropout(
            by_surgery, num_subnets=SIGMA, subnets_per_step=TAU, total_steps=4
        )
        dims_callback = {k: m.dims for k, m in gyro_layers(by_callback).items()}
        dims_surgery = {k: m.dims for k, m in gyro_layers(by_surgery).items()}
        assert dims_callback == dims_surgery
        assert set(dims_surgery.values()) == {gyrodrop.surgery.SEQUENCE_DIMS} == {(-1,)}

    def test_total_steps_come_from_max_steps(self, tmp_path):
        model = tiny_bert()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        train(make_trainer(model, tmp_path, 8, [callback]))
        assert callback.total_steps == 8
        for m in gyro_layers(model).values():
            assert m.total_steps == 8 and m.steps_per_set == 8 * TAU // SIGMA

    def test_unknown_options_are_rejected(self):
        with pytest.raises(TypeError, match="auto_step is not an option"):
            GyroDropoutCallback(auto_step=True)
        with pytest.raises(ValueError, match="GyroDropoutCallback: p must be in"):
            GyroDropoutCallback(p=-0.1)


class TestGyroDropoutCallbackStepping:
    def test_schedule_advances_once_per_optimizer_step_under_accumulation(self, tmp_path):
        model = tiny_bert()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        trainer = make_trainer(model, tmp_path, 4, [callback])
        seen = record_steps(model)  # the layer exists only after the trainer's surgery
        train(trainer)
        assert trainer.state.global_step == 4
        assert seen == [0, 0, 1, 1, 2, 2, 3, 3]
        assert {int(m.step) for m in gyro_layers(model).values()} == {4}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted optimizer steps, a checkpoint after step 3: (model, checkpoint dir)."""
    out = tmp_path_factory.mktemp("straight")
    model = tiny_bert()
    callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=5)
    train(make_trainer(model, out, 6, [callback], save_steps=3))
    return params(model), out / "checkpoint-3"


def resume(trainer, straight) -> None:
    want, ckpt = straight
    train(trainer, resume_from_checkpoint=str(ckpt))
    got = params(trainer.model)
    assert got.keys() == want.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


class TestGyroDropoutCallbackResume:
    def test_checkpoint_holds_the_gyro_steps(self, straight):
        _, ckpt = straight
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        entry = saved["stateful_callbacks"]["GyroDropoutCallback"]["attributes"]
        assert entry["global_step"] == 3 and set(entry["gyro_steps"].values()) == {3}

    def test_resumed_run_equals_uninterrupted_run(self, tmp_path, straight):
        model = tiny_bert()  # fresh weights, fresh callback: everything from the checkpoint
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=5)
        trainer = make_trainer(model, tmp_path, 6, [callback], save_steps=3)
        seen = record_steps(model)
        resume(trainer, straight)
        assert seen == [3, 3, 4, 4, 5, 5]

    def test_callback_added_after_init_resumes_from_its_saved_state(self, tmp_path, straight):
        trainer = make_trainer(tiny_bert(), tmp_path, 6, save_steps=3)
        # added late: no on_init_end, so the weights load before the surgery and the
        # steps come from the callback's entry in trainer_state.json
        trainer.add_callback(GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=5))
        resume(trainer, straight)

    def test_restoring_callback_states_from_checkpoint_also_resumes(self, tmp_path, straight):
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=5)
        trainer = make_trainer(
            tiny_bert(), tmp_path, 6, [callback], save_steps=3,
            restore_callback_states_from_checkpoint=True,
        )  # fmt: skip
        resume(trainer, straight)

    def test_resuming_a_checkpoint_saved_without_the_callback_starts_the_schedule(self, tmp_path):
        train(make_trainer(tiny_bert(), tmp_path / "a", 2, save_steps=2))  # plain dropout
        model = tiny_bert()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        trainer = make_trainer(model, tmp_path / "b", 4, [callback], save_steps=4)
        train(trainer, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
        assert {int(m.step) for m in gyro_layers(model).values()} == {2}  # 2 gyro steps
        saved = json.loads((tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text())
        assert saved["stateful_callbacks"]["GyroDropoutCallback"]["attributes"]["global_step"] == 4
