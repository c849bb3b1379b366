"""Faults found by trying gyrodrop as a newcomer, variants of the kinds of issue 11
(``shared/cases/``) on other layers, entry points and settings. Each test states the
expected behaviour; an ``xfail(strict=True)`` one is a fault still open."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import vmap
from torch.utils.checkpoint import checkpoint

import gyrodrop
from gyrodrop.dropblock import dropblock2d, gyro_dropblock2d


def _dropblocks() -> list[torch.nn.Module]:
    return [
        gyrodrop.DropBlock2d(0.3, 3),
        gyrodrop.GyroDropBlock2d(0.3, 3, 8, 4, steps_per_set=2),
    ]


# -- kind: integer input silently becomes float (case_int_input) -----------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("layer", _dropblocks(), ids=["DropBlock2d", "GyroDropBlock2d"])
def test_dropblock_refuses_integer_input_in_training(layer, dtype):
    with pytest.raises(TypeError, match="floating-point"):
        layer.train()(torch.ones(4, 2, 6, 6, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_functional_dropblock_refuses_integer_input(dtype):
    x = torch.ones(4, 2, 6, 6, dtype=dtype)
    with pytest.raises(TypeError, match="floating-point"):
        dropblock2d(x, 0.3, 3, step=0)
    with pytest.raises(TypeError, match="floating-point"):
        gyro_dropblock2d(x, 0.3, 3, step=0, num_subnets=8, subnets_per_step=2)


# -- kind: per-sample vmap silently gives every sample row 0's mask ---------------------


@pytest.mark.parametrize("layer", _dropblocks(), ids=["DropBlock2d", "GyroDropBlock2d"])
def test_dropblock_refuses_training_under_vmap(layer):
    x = torch.ones(8, 2, 6, 6)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x)


def test_dropblock_eval_under_vmap_is_the_identity():
    layer = gyrodrop.DropBlock2d(0.3, 3).eval()
    x = torch.randn(4, 2, 6, 6)
    assert torch.equal(vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x), x)


# -- kind: meta-device forward crashes (case_meta_block) --------------------------------


@pytest.mark.parametrize("layer", _dropblocks(), ids=["DropBlock2d", "GyroDropBlock2d"])
def test_dropblock_meta_forward_gives_shapes_and_does_not_step(layer):
    layer = layer.to("meta").train()
    y = layer(torch.ones(4, 2, 6, 6, device="meta"))
    assert y.shape == (4, 2, 6, 6) and y.is_meta


# -- kind: checkpoint with other mask settings loads silently (case_ckpt_hparams) --------


@pytest.mark.parametrize(
    ("saved", "loaded", "names"),
    [
        (
            lambda: gyrodrop.DropBlock2d(0.3, 3),
            lambda: gyrodrop.DropBlock2d(0.1, 5),
            ["p=0.3", "block_size=3"],
        ),
        (
            lambda: gyrodrop.DropBlock2d(0.3, 3, warmup_steps=100),
            lambda: gyrodrop.DropBlock2d(0.3, 3),
            ["warmup_steps=100"],
        ),
        (
            lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 16, 4, steps_per_set=5),
            lambda: gyrodrop.GyroDropBlock2d(0.1, 5, 16, 4, steps_per_set=5),
            ["p=0.3", "block_size=3"],
        ),
        (
            lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 16, 4, steps_per_set=5),
            lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 16, 4, steps_per_set=5, shared_channels=True),
            ["shared_channels=False"],
        ),
        (
            lambda: gyrodrop.DropBlock2d(0.3, 3),
            lambda: gyrodrop.DropBlock2d(0.3, 3, scale="realized"),
            ["scale='inverted'"],
        ),
    ],
    ids=["db-p-bs", "db-warmup", "gdb-p-bs", "gdb-shared", "db-scale"],
)
def test_dropblock_checkpoint_with_other_mask_settings_warns(saved, loaded, names):
    sd = saved().state_dict()
    with pytest.warns(UserWarning, match="checkpoint was saved with") as rec:
        loaded().load_state_dict(sd)
    text = " ".join(str(w.message) for w in rec)
    for name in names:
        assert name in text


def test_dropblock_checkpoint_with_same_settings_loads_silently():
    a = gyrodrop.GyroDropBlock2d(0.3, 3, 16, 4, steps_per_set=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(a).load_state_dict(a.state_dict())
        gyrodrop.DropBlock2d(0.3, 3).load_state_dict(gyrodrop.DropBlock2d(0.3, 3).state_dict())


# -- kind: step advanced inside forward (case_activation_checkpoint, case_reused_dropout)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("make", [_dropblocks()[0].__class__, _dropblocks()[1].__class__])
def test_dropblock_checkpoint_recompute_replays_the_masks(make, reentrant):
    def grads(use_ckpt: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        kw = {"num_subnets": 8, "subnets_per_step": 4, "steps_per_set": 1}
        drop = make(0.3, 3, **(kw if make is gyrodrop.GyroDropBlock2d else {}))
        x = torch.randn(8, 2, 8, 8, requires_grad=reentrant)
        fn = lambda t: drop(conv(t))  # noqa: E731
        out = checkpoint(fn, x, use_reentrant=reentrant) if use_ckpt else fn(x)
        out.pow(2).sum().backward()
        return conv.weight.grad.clone(), int(drop.step)

    (g0, s0), (g1, s1) = grads(False), grads(True)
    assert torch.equal(g0, g1) and s0 == s1 == 1


@pytest.mark.parametrize("gyro", [False, True])
def test_apply_dropblock_reused_module_steps_once_per_forward(gyro):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
            self.d, self.e = torch.nn.Dropout2d(0.3), torch.nn.Dropout2d(0.3)

        def forward(self, x):
            return self.e(self.d(self.conv(self.d(x))))

    net = Net()
    kw = {"gyro": True, "num_subnets": 8, "subnets_per_step": 2, "total_steps": 100}
    gyrodrop.apply_dropblock(net, block_size=3, **(kw if gyro else {}))
    net.train()(torch.randn(4, 2, 8, 8))
    assert int(net.d.step) == int(net.e.step) == 1


def test_gyro_checkpoint_with_other_unbatched_ndim_warns():
    kw = {"dims": (1,), "num_subnets": 16, "subnets_per_step": 4, "steps_per_set": 2}
    sd = gyrodrop.GyroDropout(0.5, unbatched_ndim=4, **kw).state_dict()
    with pytest.warns(UserWarning, match="unbatched_ndim=4"):
        gyrodrop.GyroDropout(0.5, **kw).load_state_dict(sd)


# -- kind: bad arguments accepted at construction (validation up front) ------------------


@pytest.mark.xfail(
    strict=True,
    reason="the trainer callbacks (lightning and transformers) accept num_subnets=0, True, "
    "tau > sigma, total_steps=0, schedule='x' at construction; the error only comes when the "
    "trainer applies them; expected ValueError at construction naming the argument",
)
@pytest.mark.parametrize("integration", ["lightning", "transformers"])
@pytest.mark.parametrize(
    "kw",
    [
        {"num_subnets": 0},
        {"num_subnets": True},
        {"subnets_per_step": 0},
        {"num_subnets": 4, "subnets_per_step": 8},
        {"total_steps": 0},
        {"schedule": "x"},
    ],
    ids=["sigma0", "sigma-bool", "tau0", "tau-gt-sigma", "total0", "schedule"],
)
def test_trainer_callbacks_validate_arguments_at_construction(integration, kw):
    if integration == "lightning":
        pytest.importorskip("lightning.pytorch")
        from gyrodrop.integrations.lightning import GyroDropoutCallback
    else:
        pytest.importorskip("transformers")
        from gyrodrop.integrations.transformers import GyroDropoutCallback
    with pytest.raises(ValueError, match=next(iter(kw))):
        GyroDropoutCallback(**kw)


def test_functional_dropblock_meta_gives_shapes():
    x = torch.ones(4, 2, 6, 6, device="meta")
    assert dropblock2d(x, 0.3, 3, step=0).shape == x.shape
    y = gyro_dropblock2d(x, 0.3, 3, step=0, num_subnets=8, subnets_per_step=2)
    assert y.shape == x.shape and y.is_meta
