"""Every gyrodrop layer under function transforms and odd inputs: correct per-sample
results under ``torch.func.vmap`` or a clear refusal, integer/bool inputs refused naming
the dtype, meta-device forwards giving the right shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import gyrodrop
from gyrodrop.gyro import gyro_dropout
from gyrodrop.stochastic_depth import StochasticDepthBlock, stochastic_depth


def layers() -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "gyro": gyrodrop.GyroDropout(0.5, 8, 4, steps_per_set=100),
            "gyro-realized": gyrodrop.GyroDropout(0.5, 8, 4, steps_per_set=100, scale="realized"),
            "gyro-channels": gyrodrop.GyroDropout(0.5, 8, 4, steps_per_set=100, dims=(1,)),
            "block-input": gyrodrop.BlockGyroLinear(
                16, 16, p=0.5, num_subnets=8, subnets_per_step=4, block_size=4, steps_per_set=9
            ),
            "block-output": gyrodrop.BlockGyroLinear(
                16,
                16,
                p=0.5,
                num_subnets=8,
                subnets_per_step=4,
                block_size=4,
                steps_per_set=9,
                prune="output",
            ),
            "depth-sample": gyrodrop.StochasticDepth(0.5, "sample"),
            "depth-block": gyrodrop.StochasticDepth(0.5, "block"),
        }


NAMES = sorted(layers())
ROW_DEPENDENT = {n for n in NAMES if n != "depth-block"}


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    params = {k: v.detach() for k, v in model.named_parameters()}
    bufs = dict(model.named_buffers())

    def loss(p, xi, yi):
        out = functional_call(model, (p, bufs), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


class TestVmap:
    @pytest.mark.parametrize("name", sorted(ROW_DEPENDENT))
    def test_row_dependent_layers_refuse_vmap_over_the_batch(self, name: str):
        layer = layers()[name]
        layer.auto_step = False
        model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 2))
        x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
        with pytest.raises(
            RuntimeError, match=r"cannot run in training mode under torch.func.vmap"
        ):
            per_sample_grads(model, x, y)

    def test_block_stochastic_depth_per_sample_grads_sum_to_the_batch_grad(self):
        torch.manual_seed(0)
        for step in range(6):  # both decisions occur
            sd = gyrodrop.StochasticDepth(0.5, "block", auto_step=False)
            sd.step.fill_(step)
            model = nn.Sequential(nn.Linear(8, 16), sd, nn.Linear(16, 2))
            x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            g = per_sample_grads(model, x, y)
            assert torch.allclose(g["0.weight"].sum(0), model[0].weight.grad, atol=1e-5)

    @pytest.mark.parametrize("name", NAMES)
    def test_eval_mode_layers_work_under_vmap(self, name: str):
        layer = layers()[name].eval()
        width = 16
        out = vmap(layer)(torch.randn(3, 2, width))
        assert out.shape == (3, 2, width)

    def test_functional_gyro_dropout_refuses_vmap(self):
        f = lambda t: gyro_dropout(t, 0.5, step=0, num_subnets=8, subnets_per_step=4)  # noqa: E731
        with pytest.raises(RuntimeError, match="gyro_dropout: cannot run in training mode"):
            vmap(f)(torch.randn(4, 1, 8))

    def test_vmap_without_batching_the_input_is_accepted(self):
        # jacfwd vmaps the tangents, not the input: the layer sees the real batch
        drop = gyrodrop.GyroDropout(0.5, 8, 4, steps_per_set=100, auto_step=False)
        x = torch.randn(4, 3)
        jac = torch.func.jacfwd(drop)(x)
        mask = drop(x) / x
        assert torch.allclose(jac.reshape(12, 12).diagonal(), mask.flatten())


class TestDtype:
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
    def test_integer_and_bool_inputs_are_refused_naming_the_dtype(self, name, dtype):
        layer = layers()[name]
        x = torch.ones(8, 16, dtype=dtype)
        with pytest.raises(
            TypeError,
            match=rf"{type(layer).__name__}: input must be a "
            rf"floating-point tensor, got dtype {dtype}",
        ):
            layer(x)
        assert layer.current_step() == 0

    def test_functional_forms_refuse_integers(self):
        x = torch.ones(8, 16, dtype=torch.int64)
        with pytest.raises(TypeError, match="gyro_dropout: input must be a floating-point"):
            gyro_dropout(x, 0.5, step=0, num_subnets=8, subnets_per_step=4)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    @pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("block")])
    def test_float_dtypes_are_kept(self, name, dtype):
        assert layers()[name](torch.ones(8, 16, dtype=dtype)).dtype == dtype

    def test_realized_scale_is_not_truncated(self):
        drop = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100, scale="realized")
        y = drop(torch.ones(8, 16, dtype=torch.float64))
        kept = (y[0] != 0).sum().item()
        assert torch.allclose(y[0][y[0] != 0], torch.full((kept,), 16 / kept, dtype=torch.float64))

    def test_int_input_in_eval_is_passed_through_like_nn_dropout(self):
        x = torch.ones(4, 16, dtype=torch.int64)
        assert torch.equal(layers()["gyro"].eval()(x), nn.Dropout(0.5).eval()(x))


class TestMeta:
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("training", [True, False])
    def test_meta_forward_gives_the_shape_and_keeps_the_step(self, name, training):
        layer = layers()[name].train(training)
        x = torch.empty(8, 16, device="meta")
        if not name.startswith("block"):  # a Linear needs its weight on the input's device
            out = layer(x)
            assert out.is_meta and out.shape == (8, 16)
            assert layer.current_step() == 0
        layer.to("meta")
        out = layer(x)
        assert out.is_meta and out.shape == (8, 16)

    def test_block_gyro_linear_built_on_meta(self):
        layer = gyrodrop.BlockGyroLinear(
            16, 4, p=0.5, num_subnets=16, block_size=4, total_steps=100, device="meta"
        )
        assert layer(torch.empty(8, 16, device="meta")).shape == (8, 4)
        assert layer(torch.empty(8, 3, 16, device="meta")).shape == (8, 3, 4)

    def test_surgery_on_a_meta_model_then_meta_forward(self):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gyrodrop.apply_block_gyro(model, block_size=4, steps_per_set=1)
        assert model(torch.empty(8, 16, device="meta")).shape == (8, 4)

    def test_stochastic_depth_block_on_meta(self):
        class Res(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(16, 16)

            def branch(self, x):
                return self.fc(x)

            def shortcut(self, x):
                return x

            def forward(self, x):
                return x + self.fc(x)

        with torch.device("meta"):
            block = StochasticDepthBlock(Res(), 0.5, "block")
        assert block(torch.empty(4, 16, device="meta")).shape == (4, 16)
        y = stochastic_depth(torch.empty(4, 16, device="meta"), 0.5, "sample")
        assert y.shape == (4, 16)
