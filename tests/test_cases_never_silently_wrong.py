"""The right value of each user case of issue 11 that concerns stepping and validation
(``shared/cases/case_*.py``), one test each; the broader tests of each kind are in
``test_schedule_stepping.py``, ``test_schedule_inputs.py`` and
``test_schedule_validation.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import gyrodrop
from gyrodrop.gyro import gyro_dropout


def test_case_activation_checkpoint():
    def grads(use_ckpt: bool) -> tuple[torch.Tensor, gyrodrop.GyroDropout]:
        torch.manual_seed(0)
        lin, drop = nn.Linear(16, 16), gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
        x = torch.randn(8, 16)
        fn = lambda t: drop(lin(t))  # noqa: E731
        out = checkpoint(fn, x, use_reentrant=False) if use_ckpt else fn(x)
        out.pow(2).sum().backward()
        return lin.weight.grad, drop

    (g0, _), (g1, d) = grads(False), grads(True)
    assert torch.equal(g0, g1) and int(d.step) == 1

    class Blk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def branch(self, x):
            return self.fc(x)

        def shortcut(self, x):
            return x

        def forward(self, x):
            return x + self.fc(x)

    net = nn.Sequential(*[Blk() for _ in range(4)])
    gyrodrop.apply_stochastic_depth(net, drop_rate=0.5, drop_distribution="uniform")
    for _ in range(4):  # no CheckpointError
        checkpoint(net, torch.randn(4, 8, requires_grad=True), use_reentrant=False).sum().backward()


def test_case_reused_dropout():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.1,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    assert gyrodrop.apply_gyro_dropout(model, num_subnets=16, subnets_per_step=4, total_steps=40)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(10):
        opt.zero_grad()
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
    layers = [m for m in model.modules() if isinstance(m, gyrodrop.GyroDropout)]
    assert {int(m.step) for m in layers} == {10}

    class Logits(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    clf = Logits(model)
    trained = gyrodrop.subnet_ensemble_predict(clf, x, pairing="trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = gyrodrop.subnet_ensemble_predict(clf, x)  # "auto" finds the shared schedule
    assert torch.equal(auto.mean, trained.mean)


def test_case_vmap_per_sample():
    torch.manual_seed(0)
    drop = gyrodrop.GyroDropout(
        0.5, num_subnets=8, subnets_per_step=4, steps_per_set=100, auto_step=False
    )
    model = nn.Sequential(nn.Linear(8, 16), drop, nn.Linear(16, 2))
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    bufs = dict(model.named_buffers())

    def loss(p, xi, yi):
        out = functional_call(model, (p, bufs), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    with pytest.raises(RuntimeError, match="GyroDropout: cannot run in training mode under"):
        vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_case_int_input():
    x = torch.ones(8, 16, dtype=torch.int64)
    for layer in (
        gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100),
        gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100, scale="realized"),
        gyrodrop.StochasticDepth(0.5, "sample"),
        gyrodrop.BlockGyroLinear(16, 4, p=0.5, num_subnets=16, block_size=4, total_steps=100),
    ):
        with pytest.raises(TypeError, match=r"got dtype torch.int64"):
            layer(x)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-0.1,), {}, r"p must be in \[0, 1\), got -0.1"),
        ((1.5,), {}, r"p must be in \[0, 1\), got 1.5"),
        ((0.5,), {"num_subnets": 4, "subnets_per_step": 2, "schedule": "foo"}, "schedule must"),
        ((0.5,), {"num_subnets": 4, "subnets_per_step": 2, "scale": "foo"}, "scale must"),
        (("0.5",), {}, r"p must be a float in \[0, 1\), got '0.5'"),
    ],
)
def test_case_functional(args, kwargs, match):
    opts = {"num_subnets": 16, "subnets_per_step": 4, **kwargs}
    with pytest.raises(ValueError, match=f"gyro_dropout: {match}"):
        gyro_dropout(torch.ones(8, 16), *args, step=0, **opts)


def test_case_huge_sigma():
    d = gyrodrop.GyroDropout(0.5, num_subnets=2**40, subnets_per_step=1, total_steps=100)
    assert d(torch.ones(4, 8)).shape == (4, 8)


def test_case_ckpt_hparams():
    a = gyrodrop.GyroDropout(0.5, num_subnets=16, subnets_per_step=4, steps_per_set=1)
    for _ in range(5):
        a(torch.ones(8, 32))
    b = gyrodrop.GyroDropout(0.2, num_subnets=8, subnets_per_step=2, steps_per_set=1)
    with pytest.warns(UserWarning, match=r"num_subnets=16 \(this layer: 8\)"):
        b.load_state_dict(a.state_dict(), strict=True)


def test_case_step_n():
    d = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)
    with pytest.raises(ValueError, match=r"gyrodrop.step: n must be >= 0, got -5"):
        gyrodrop.step(d, -5)
    with pytest.raises(ValueError, match=r"gyrodrop.step: n must be an int, got 1.5"):
        gyrodrop.step(d, 1.5)  # type: ignore[arg-type]
    assert int(d.step) == 0


def test_case_subnet_mask_k():
    d = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)
    with pytest.raises(ValueError, match=r"GyroDropout: k must be in \[0, 15\], got 999"):
        d.subnet_mask(999, torch.ones(2, 8))
    b = gyrodrop.BlockGyroLinear(16, 4, p=0.5, num_subnets=16, block_size=4, total_steps=100)
    with pytest.raises(ValueError, match=r"BlockGyroLinear: k must be in \[0, 15\], got 999"):
        b.subnet_mask(999)


def test_case_meta_block():
    layer = gyrodrop.BlockGyroLinear(
        16, 4, p=0.5, num_subnets=16, block_size=4, total_steps=100, device="meta"
    )
    expected = nn.Linear(16, 4, device="meta")(torch.empty(8, 16, device="meta"))
    out = layer(torch.empty(8, 16, device="meta"))
    assert out.is_meta and out.shape == expected.shape
