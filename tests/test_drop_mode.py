"""Early and late dropout (Liu et al., ICML 2023, "Dropout Reduces Underfitting")
through the surgery functions: every apply_* takes drop_mode and drop_cutoff (a
fraction of total_steps), and a model trained past the cutoff computes what eval does
(early) or starts dropping there (late). Per-layer behaviour is in
tests/test_contract.py (TestEarlyAndLateDropout)."""

import warnings

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.stepping import SteppedModule

TOTAL = 10  # cutoff 0.3 of 10 steps: step 3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def branch(self, x):
        return self.fc(x)

    def shortcut(self, x):
        return x

    def forward(self, x):
        return self.shortcut(x) + self.branch(x)


def residual():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def sd(model, **kw):
    return gyrodrop.apply_stochastic_depth(model, drop_rate=0.5, target=Block, **kw)


APPLY = {
    "apply_gyro_dropout": (
        mlp,
        lambda m, **kw: gyrodrop.apply_gyro_dropout(m, num_subnets=8, subnets_per_step=2, **kw),
        (4, 6),
    ),
    "apply_block_gyro": (
        mlp,
        lambda m, **kw: gyrodrop.apply_block_gyro(
            m, num_subnets=8, subnets_per_step=2, block_size=4, **kw
        ),
        (4, 6),
    ),
    "apply_dropblock": (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.2)),
        lambda m, **kw: gyrodrop.apply_dropblock(m, block_size=3, **kw),
        (4, 1, 8, 8),
    ),
    "apply_dropblock(gyro)": (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.2)),
        lambda m, **kw: gyrodrop.apply_dropblock(
            m, block_size=3, gyro=True, num_subnets=8, subnets_per_step=2, **kw
        ),
        (4, 1, 8, 8),
    ),
    "apply_stochastic_depth": (residual, sd, (4, 6)),
}


def layers(model):
    return [m for m in model.modules() if isinstance(m, SteppedModule)]


@pytest.mark.parametrize("name", list(APPLY))
class TestApply:
    def test_every_layer_gets_the_mode_and_the_cutoff_step(self, name):
        build, apply, _ = APPLY[name]
        model = build()
        assert apply(model, total_steps=TOTAL, drop_mode="late", drop_cutoff=0.3) >= 1
        assert layers(model)
        for layer in layers(model):
            assert (layer.drop_mode, layer.cutoff_step) == ("late", 3)

    def test_early_training_after_the_cutoff_computes_what_eval_does(self, name):
        build, apply, shape = APPLY[name]
        model = build()
        apply(model, total_steps=TOTAL, drop_mode="early", drop_cutoff=0.3)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.eval()
            plain = model(x)
            model.train()
            before = [model(x) for _ in range(3)]
            after = [model(x) for _ in range(3)]
        assert all(torch.equal(y, plain) for y in after)
        assert not all(torch.equal(y, plain) for y in before)
        assert all(layer.current_step() == 6 for layer in layers(model))

    def test_a_fractional_cutoff_without_total_steps_is_refused(self, name):
        build, apply, _ = APPLY[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no total_steps / steps_per_set for the schedule
            with pytest.raises(ValueError, match=r"drop_cutoff=0.3 is a fraction of total_steps"):
                apply(build(), drop_mode="early", drop_cutoff=0.3)
