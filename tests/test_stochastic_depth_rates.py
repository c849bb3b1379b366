"""depth_rates: timm's per-block drop-path rates of a model of stages, and their use
as apply_stochastic_depth's drop_rate."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop.stochastic_depth import StochasticDepthLayer


class TestDepthRates:
    def test_linear_matches_timm_linspace_over_all_blocks_split_per_stage(self):
        depths = [2, 2, 6, 2]
        rates = gyrodrop.depth_rates(0.2, depths)
        expected = torch.linspace(0, 0.2, sum(depths), dtype=torch.float64).split(depths)
        assert [len(stage) for stage in rates] == depths
        for stage, ref in zip(rates, expected, strict=True):
            assert stage == pytest.approx(ref.tolist(), abs=1e-12)
        assert rates[0][0] == 0.0 and rates[-1][-1] == 0.2

    def test_int_depths_is_one_stage(self):
        assert gyrodrop.depth_rates(0.3, 4) == [[0.0, 0.1, 0.2, 0.3]]
        assert gyrodrop.depth_rates(0.3, 1) == [[0.0]]  # as timm: linspace(0, r, 1)

    def test_stagewise_gives_one_rate_per_stage_growing_over_stages(self):
        assert gyrodrop.depth_rates(0.4, [1, 2, 3], stagewise=True) == [
            [0.0],
            [0.2, 0.2],
            [0.4, 0.4, 0.4],
        ]
        assert gyrodrop.depth_rates(0.4, [3], stagewise=True) == [[0.0, 0.0, 0.0]]

    @pytest.mark.parametrize("stagewise", [False, True])
    def test_uniform_is_the_rate_everywhere(self, stagewise):
        assert gyrodrop.depth_rates(0.1, [2, 1], "uniform", stagewise) == [[0.1, 0.1], [0.1]]

    @given(
        rate=st.floats(0.0, 0.99),
        depths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
        stagewise=st.booleans(),
    )
    def test_linear_rates_are_nondecreasing_in_range_and_shaped_like_depths(
        self, rate, depths, stagewise
    ):
        rates = gyrodrop.depth_rates(rate, depths, stagewise=stagewise)
        assert [len(s) for s in rates] == depths
        flat = sum(rates, [])
        assert all(0.0 <= r <= rate + 1e-12 for r in flat)
        assert all(b >= a for a, b in zip(flat, flat[1:], strict=False))
        if len(flat) > 1 and (not stagewise or len(depths) > 1):
            assert flat[-1] == pytest.approx(rate)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"drop_rate": 1.0, "depths": 3}, "depth_rates: drop_rate must be in [0, 1), got 1.0"),
            ({"drop_rate": "0.1", "depths": 3}, "depth_rates: drop_rate must be a float"),
            ({"drop_rate": 0.1, "depths": 0}, "depth_rates: depths must be >= 1, got 0"),
            ({"drop_rate": 0.1, "depths": [2, 0]}, "depth_rates: depths[1] must be >= 1, got 0"),
            ({"drop_rate": 0.1, "depths": []}, "depth_rates: depths must be an int or a non-empty"),
            ({"drop_rate": 0.1, "depths": [2.0]}, "depth_rates: depths[0] must be an int"),
            (
                {"drop_rate": 0.1, "depths": 2, "distribution": "cosine"},
                "depth_rates: distribution must be",
            ),
            (
                {"drop_rate": 0.1, "depths": 2, "stagewise": 1},
                "depth_rates: stagewise must be a bool",
            ),
        ],
    )
    def test_bad_arguments_are_refused_naming_them(self, kwargs, message):
        with pytest.raises(ValueError) as err:
            gyrodrop.depth_rates(**kwargs)
        assert str(err.value).startswith(message)
        assert "\n" not in str(err.value)


def encoder(layers=4):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TestApplyStochasticDepthWithRates:
    def test_per_stage_rates_reach_each_layer_in_order(self):
        net = encoder(4)
        rates = gyrodrop.depth_rates(0.3, [2, 2])
        assert gyrodrop.apply_stochastic_depth(net, drop_rate=rates) == 4
        got = [m.stochastic_depth.p for m in net.modules() if isinstance(m, StochasticDepthLayer)]
        assert got == pytest.approx([0.0, 0.1, 0.2, 0.3])

    def test_flat_rates_are_used_as_given(self):
        net = encoder(3)
        gyrodrop.apply_stochastic_depth(net, drop_rate=[0.3, 0.0, 0.1], drop_distribution="linear")
        got = [m.stochastic_depth.p for m in net.modules() if isinstance(m, StochasticDepthLayer)]
        assert got == pytest.approx([0.3, 0.0, 0.1])

    def test_a_count_that_differs_from_the_blocks_found_is_refused_and_nothing_changes(self):
        net = encoder(3)
        with pytest.raises(ValueError, match=r"drop_rate has 2 rates but 3 blocks"):
            gyrodrop.apply_stochastic_depth(net, drop_rate=[0.1, 0.2])
        assert not any(isinstance(m, StochasticDepthLayer) for m in net.modules())

    def test_a_bad_rate_in_the_list_is_refused_naming_its_place(self):
        with pytest.raises(ValueError, match=r"drop_rate\[1\]\[0\] must be in \[0, 1\), got 1.5"):
            gyrodrop.apply_stochastic_depth(encoder(3), drop_rate=[[0.1], [1.5, 0.1]])


@pytest.mark.parametrize(
    "depths", [np.array([2, 3]), torch.tensor([2, 3]), np.array([2, 3], dtype=np.int32)]
)
def test_depths_as_a_1d_tensor_or_numpy_array_equal_the_list(depths):
    # timm configs and numpy code hand depths over as arrays: the same rates as the list.
    assert gyrodrop.depth_rates(0.2, depths) == gyrodrop.depth_rates(0.2, [2, 3])


@pytest.mark.parametrize("depths", [torch.tensor([2.0, 3.0]), torch.tensor([[2, 3]]), np.array([])])
def test_depths_arrays_that_are_not_1d_ints_are_refused_naming_depths(depths):
    with pytest.raises(ValueError, match=r"depth_rates: depths"):
        gyrodrop.depth_rates(0.2, depths)
