"""Tests for gyrodrop.experiments.models: shapes, dropout placement, ResNet blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.experiments.models import (
    DEFAULT_WIDTHS,
    MODELS,
    BasicBlock,
    build_model,
    image_shape,
)

SHAPES = [(64,), (1, 28, 28), (3, 32, 32)]


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


class TestBuildModel:
    @pytest.mark.parametrize(
        "name", [m for m in MODELS if m not in ("resnet18", "paper-lenet", "paper-alexnet")]
    )
    @pytest.mark.parametrize("shape", SHAPES)
    def test_logits_and_features_have_expected_shapes(
        self, name: str, shape: tuple[int, ...]
    ) -> None:
        model = build_model(name, shape, 7, 0.5)
        x = torch.randn(3, *shape)
        assert model(x).shape == (3, 7)
        assert model.features(x).shape == (3, DEFAULT_WIDTHS[name][-1])

    @pytest.mark.parametrize("shape", [(64,), (3, 32, 32)])
    def test_resnet18_runs_on_small_and_cifar_images(self, shape: tuple[int, ...]) -> None:
        model = build_model("resnet18", shape, 10, 0.5).eval()
        assert model(torch.randn(2, *shape)).shape == (2, 10)

    @pytest.mark.parametrize(
        ("name", "count"),
        [("mlp", 2), ("mlp1", 2), ("mlp2", 3), ("lenet", 2), ("alexnet", 2), ("resnet18", 1)],
    )
    def test_dropout_before_every_fc_layer_but_the_first(self, name: str, count: int) -> None:
        model = build_model(name, (3, 32, 32), 10, 0.3)
        drops = _dropouts(model)
        assert len(drops) == count and all(d.p == 0.3 for d in drops)
        # in module order (input to output), the leaf after each dropout is a Linear
        leaves = [m for m in model.modules() if not list(m.children())]
        after = [leaves[i + 1] for i, m in enumerate(leaves) if isinstance(m, nn.Dropout)]
        assert len(after) == count and all(isinstance(m, nn.Linear) for m in after)

    def test_no_dropout_layers_when_p_is_zero(self) -> None:
        assert _dropouts(build_model("mlp2", (20,), 3, 0.0)) == []

    def test_gyro_surgery_replaces_every_dropout(self) -> None:
        model = build_model("lenet", (1, 28, 28), 10, 0.5)
        n = gyrodrop.apply_gyro_dropout(model, num_subnets=8, subnets_per_step=2, total_steps=10)
        assert n == 2 and _dropouts(model) == []
        model.train()
        assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)

    def test_widths_override_hidden_sizes(self) -> None:
        model = build_model("mlp", (5,), 2, 0.5, widths=(12, 6))
        assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [12, 6, 2]

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"name": "vgg"}, "name must be one of"),
            ({"p": 1.0}, r"p must be in \[0, 1\)"),
            ({"num_classes": 1}, "num_classes must be >= 2"),
            ({"in_shape": ()}, "in_shape"),
        ],
    )
    def test_invalid_arguments_raise_value_error(self, kwargs: dict, match: str) -> None:
        args = {"name": "mlp", "in_shape": (4,), "num_classes": 3, "p": 0.5} | kwargs
        with pytest.raises(ValueError, match=match):
            build_model(**args)

    def test_conv_net_on_non_square_table_says_use_an_mlp(self) -> None:
        with pytest.raises(ValueError, match="use --model mlp"):
            build_model("lenet", (30,), 2, 0.5)

    def test_init_is_reproducible_under_a_seeded_fork(self) -> None:
        def make() -> torch.Tensor:
            with torch.random.fork_rng():
                torch.manual_seed(3)
                return build_model("mlp", (8,), 2, 0.5).classifier.weight.detach().clone()

        assert torch.equal(make(), make())


class TestImageShape:
    def test_flat_square_becomes_one_channel(self) -> None:
        assert image_shape("x", (64,)) == (1, 8, 8)
        assert image_shape("x", (28, 28)) == (1, 28, 28)


class TestBasicBlock:
    def test_torchvision_attribute_names(self) -> None:
        block = BasicBlock(4, 8, stride=2)
        for name in ("conv1", "bn1", "relu", "conv2", "bn2", "downsample"):
            assert hasattr(block, name)
        assert BasicBlock(4, 4).downsample is None

    @pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 4, 1), (4, 8, 2)])
    def test_forward_is_residual_branch_plus_shortcut(
        self, cin: int, cout: int, stride: int
    ) -> None:
        block = BasicBlock(cin, cout, stride).eval()
        x = torch.randn(2, cin, 6, 6)
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        shortcut = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(block(x), torch.relu(branch + shortcut))


class TestPaperModels:
    """The authors' TensorFlow models: shapes, parameter counts, no bias, Xavier init."""

    def test_paper_mlp_is_four_bias_free_fc_layers_of_1024(self) -> None:
        net = build_model("paper-mlp", (1, 24, 24), 10, 0.5)
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [tuple(m.weight.shape) for m in linears] == [
            (1024, 576),
            (1024, 1024),
            (1024, 1024),
            (10, 1024),
        ]
        assert all(m.bias is None for m in linears)
        assert sum(p.numel() for p in net.parameters()) == 576 * 1024 + 2 * 1024**2 + 10240

    def test_dropout_after_every_hidden_relu(self) -> None:
        net = build_model("paper-mlp", (1, 8, 8), 10, 0.5, widths=(32, 32, 32))
        kinds = [type(m).__name__ for m in net.modules() if not list(m.children())]
        assert kinds == [
            "Flatten",
            *["Linear", "ReLU", "Dropout"] * 3,
            "Linear",
        ]

    @pytest.mark.parametrize(
        ("name", "convs", "flat"),
        [
            ("paper-lenet", [(96, 1, 5, 5), (256, 96, 5, 5)], 256 * 12 * 12),
            (
                "paper-alexnet",
                [(96, 3, 5, 5), (256, 96, 5, 5), (384, 256, 5, 5)],
                384 * 6 * 6,
            ),
        ],
    )
    def test_conv_shapes_and_parameter_count_on_24x24_crops(
        self, name: str, convs: list, flat: int
    ) -> None:
        c = convs[0][1]
        with torch.device("meta"):  # full size, no memory
            net = build_model(name, (c, 24, 24), 10, 0.5, width_mult=1.0)
            assert net(torch.zeros(2, c, 24, 24)).shape == (2, 10)
        got = [tuple(m.weight.shape) for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert got == convs
        conv_params = sum(math.prod(s) for s in convs)
        fc_params = flat * 1024 + 1024 * 1024 + 1024 * 10
        assert sum(p.numel() for p in net.parameters()) == conv_params + fc_params
        assert all(getattr(m, "bias", None) is None for m in net.modules())

    @pytest.mark.parametrize("name", ["paper-lenet", "paper-alexnet"])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_scaled_conv_nets_run_on_every_input_shape(
        self, name: str, shape: tuple[int, ...]
    ) -> None:
        net = build_model(name, shape, 10, 0.5, widths=(32, 32), width_mult=0.1)
        x = torch.zeros(2, *shape)
        assert net(x).shape == (2, 10)
        assert net.features(x).shape == (2, 32)

    def test_width_mult_scales_the_conv_channels(self) -> None:
        net = build_model("paper-lenet", (1, 24, 24), 10, 0.5, widths=(64, 64), width_mult=0.25)
        got = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert got == [24, 64]
        assert net(torch.zeros(3, 1, 24, 24)).shape == (3, 10)

    def test_width_mult_is_rejected_for_other_models(self) -> None:
        with pytest.raises(ValueError, match="width_mult applies to paper-lenet"):
            build_model("mlp", (64,), 10, 0.5, width_mult=0.5)

    def test_xavier_uniform_bounds(self) -> None:
        torch.manual_seed(0)
        net = build_model("paper-mlp", (1, 8, 8), 10, 0.5, widths=(256, 256, 256))
        for m in net.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                assert float(m.weight.detach().abs().max()) <= bound
                assert float(m.weight.detach().abs().max()) > 0.9 * bound

    def test_gyro_surgery_finds_every_dropout(self) -> None:
        net = build_model("paper-mlp", (1, 8, 8), 10, 0.5, widths=(32, 32, 32))
        assert (
            gyrodrop.apply_gyro_dropout(net, total_steps=10, num_subnets=4, subnets_per_step=2) == 3
        )
