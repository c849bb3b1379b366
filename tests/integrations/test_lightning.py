"""GyroDropoutCallback for PyTorch Lightning: surgery, one step per optimizer step under
gradient accumulation, and resume from a checkpoint continuing the identical masks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gyrodrop

pl = pytest.importorskip("lightning.pytorch")  # CI installs the [lightning] extra

from gyrodrop.integrations.lightning import GyroDropoutCallback  # noqa: E402

ROWS, BATCH, ACCUMULATE = 16, 4, 2  # 4 batches, 2 optimizer steps per epoch
SIGMA, TAU = 4, 2


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, 32), nn.ReLU(), nn.Dropout1d(0.25),  # channel-wise on (B, C)
            nn.Linear(32, 3),
        )  # fmt: skip
        self.seen_steps: list[int] = []  # gyro step of each training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.training:
            self.seen_steps.append(int(self.net[2].step))
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(ROWS, 10, generator=g), torch.randint(0, 3, (ROWS,), generator=g)
    )
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def trainer(tmp_path, max_epochs: int, callbacks: list, checkpoint: bool = False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )


def fit(tr: pl.Trainer, module: pl.LightningModule, **kw) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        tr.fit(module, train_dataloaders=loader(), **kw)


def gyro_layers(module: nn.Module) -> list[gyrodrop.GyroDropout]:
    return [m for m in module.modules() if isinstance(m, gyrodrop.GyroDropout)]


class TestGyroDropoutCallbackSurgery:
    def test_setup_replaces_dropout_with_trainer_stepped_gyro_layers(self, tmp_path):
        module, callback = (
            TinyModule(),
            GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU),
        )
        fit(trainer(tmp_path, 1, [callback]), module)
        layers = gyro_layers(module)
        assert callback.replaced == 2 and len(layers) == 2
        assert [m.p for m in layers] == [0.5, 0.25]
        assert layers[1].dims == (1,)
        assert not any(m.auto_step for m in layers)

    def test_total_steps_come_from_estimated_stepping_batches(self, tmp_path):
        module, callback = (
            TinyModule(),
            GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU),
        )
        fit(trainer(tmp_path, 3, [callback]), module)
        total = 3 * ROWS // BATCH // ACCUMULATE  # 6 optimizer steps
        assert callback.total_steps == total
        for m in gyro_layers(module):
            assert m.total_steps == total and m.steps_per_set == total * TAU // SIGMA

    def test_explicit_steps_per_set_is_kept(self, tmp_path):
        module = TinyModule()
        callback = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, steps_per_set=5)
        fit(trainer(tmp_path, 1, [callback]), module)
        assert [m.steps_per_set for m in gyro_layers(module)] == [5, 5]
        assert callback.total_steps is None

    def test_unknown_options_are_rejected(self):
        with pytest.raises(TypeError, match="auto_step is not an option"):
            GyroDropoutCallback(auto_step=True)
        with pytest.raises(TypeError, match="unexpected keyword arguments \\['block_size'\\]"):
            GyroDropoutCallback(block_size=4)
        with pytest.raises(ValueError, match="GyroDropoutCallback: p must be in"):
            GyroDropoutCallback(p=1.0)


class TestGyroDropoutCallbackStepping:
    def test_schedule_advances_once_per_optimizer_step_under_accumulation(self, tmp_path):
        module, callback = (
            TinyModule(),
            GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU),
        )
        tr = trainer(tmp_path, 3, [callback])
        fit(tr, module)
        assert tr.global_step == 6
        # two accumulated batches per optimizer step share the step (hence the masks)
        assert module.seen_steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert [int(m.step) for m in gyro_layers(module)] == [tr.global_step] * 2


class TestGyroDropoutCallbackResume:
    def test_resumed_run_equals_uninterrupted_run(self, tmp_path):
        ckpt_dir = tmp_path / "ckpt"
        straight = TinyModule()
        saver = pl.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}"
        )
        cb = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=3)
        fit(trainer(tmp_path / "a", 4, [cb, saver], checkpoint=True), straight)

        resumed = TinyModule()  # fresh weights, fresh callback: everything from the file
        cb2 = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU, seed=3)
        tr = trainer(tmp_path / "b", 4, [cb2])
        fit(tr, resumed, ckpt_path=str(ckpt_dir / "epoch=1.ckpt"))  # after 4 of 8 steps

        assert resumed.seen_steps == [4, 4, 5, 5, 6, 6, 7, 7]
        assert cb2.total_steps == cb.total_steps == 8
        for (name, a), b in zip(
            straight.state_dict().items(), resumed.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)

    def test_callback_state_dict_round_trips_the_module_steps(self, tmp_path):
        module, callback = (
            TinyModule(),
            GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU),
        )
        fit(trainer(tmp_path, 1, [callback]), module)
        state = callback.state_dict()
        assert state["gyro_steps"] == {"net.2": 2, "net.5": 2}
        assert state["global_step"] == 2 and state["args"]["num_subnets"] == SIGMA
        fresh = GyroDropoutCallback(num_subnets=SIGMA, subnets_per_step=TAU)
        fresh.load_state_dict(state)
        assert fresh.total_steps == state["total_steps"]
