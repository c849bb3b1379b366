"""DropBlock3d and GyroDropBlock3d: cubes over (B, C, D, H, W) volumes, drop fraction,
scaling, the 2-d masks at depth 1, DDP rows, schedule, surgery on nn.Dropout3d."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop import distributed
from gyrodrop.dropblock import dropblock2d, dropblock3d, gyro_dropblock2d, gyro_dropblock3d
from gyrodrop.spatial_masks import drop_probabilities


def dropped(y):
    return y == 0


def is_union_of_cubes(drop, block_size):
    """Is every dropped voxel of ``drop`` (N, D, H, W) inside a fully dropped block
    that fits in the volume? (Opening by the block is the identity.)"""
    b = tuple(min(block_size, n) for n in drop.shape[-3:])
    d = drop.to(torch.float32).unsqueeze(1)
    full = -F.max_pool3d(-d, b, stride=1)
    pad = (b[2] - 1, b[2] - 1, b[1] - 1, b[1] - 1, b[0] - 1, b[0] - 1)
    return bool(torch.equal(F.max_pool3d(F.pad(full, pad), b, stride=1), d))


class TestDropBlock3dMasks:
    @pytest.mark.parametrize(("p", "block_size"), [(0.05, 3), (0.1, 3), (0.1, 5), (0.15, 2)])
    def test_drop_fraction_over_many_volumes_is_within_002_of_p(self, p, block_size):
        y = dropblock3d(torch.ones(64, 8, 8, 16, 16), p, block_size, step=3, seed=1)
        assert abs(dropped(y).float().mean().item() - p) < 0.02
        expected = drop_probabilities(p, block_size, 8, 16, 16).mean().item()
        assert dropped(y).float().mean().item() == pytest.approx(expected, abs=0.005)

    @given(
        p=st.sampled_from([0.1, 0.3]),
        block_size=st.integers(1, 5),
        sizes=st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
        seed=st.integers(0, 2**31),
    )
    @settings(max_examples=30, deadline=None)
    def test_dropped_voxels_form_whole_cubes(self, p, block_size, sizes, seed):
        y = gyrodrop.DropBlock3d(p, block_size, seed=seed)(torch.ones(4, 3, *sizes))
        assert is_union_of_cubes(dropped(y).reshape(-1, *sizes), block_size)

    def test_inverted_scaling_is_unbiased_per_voxel(self):
        y = dropblock3d(torch.ones(3000, 1, 5, 6, 6), 0.3, 3, step=0, seed=3)
        assert torch.allclose(y.mean(dim=(0, 1)), torch.ones(5, 6, 6), atol=0.12)

    def test_realized_scaling_preserves_each_masks_sum(self):
        y = dropblock3d(torch.ones(6, 4, 5, 7, 9), 0.3, 3, step=2, scale="realized")
        sums = y.sum(dim=(2, 3, 4))
        kept_any = (y != 0).flatten(2).any(dim=2)
        assert torch.allclose(sums[kept_any], torch.full_like(sums[kept_any], 5 * 7 * 9.0))

    def test_a_volume_of_depth_one_gets_the_2d_masks(self):
        x = torch.rand(3, 4, 10, 10) + 0.5
        y2 = dropblock2d(x, 0.3, 3, step=7, seed=5)
        y3 = dropblock3d(x[:, :, None], 0.3, 3, step=7, seed=5)
        assert torch.equal(y3[:, :, 0], y2)
        g2 = gyro_dropblock2d(x, 0.3, 3, step=7, seed=5, num_subnets=8, subnets_per_step=2)
        g3 = gyro_dropblock3d(
            x[:, :, None], 0.3, 3, step=7, seed=5, num_subnets=8, subnets_per_step=2
        )
        assert torch.equal(g3[:, :, 0], g2)

    def test_shared_channels_gives_one_mask_for_all_channels(self):
        y = dropblock3d(torch.ones(3, 5, 4, 8, 8), 0.3, 3, step=0, shared_channels=True)
        assert torch.equal(dropped(y), dropped(y[:, :1]).expand_as(y))

    def test_each_data_parallel_rank_draws_its_rows_of_the_global_batch(self, monkeypatch):
        x = torch.ones(8, 2, 4, 6, 6)
        full = dropblock3d(x, 0.3, 3, step=4, seed=1)
        monkeypatch.setattr(distributed, "row_window", lambda b: (4, 8))  # rank 1 of 2
        assert torch.equal(dropblock3d(x[4:], 0.3, 3, step=4, seed=1), full[4:])


class TestDropBlock3dModule:
    def test_module_equals_the_functional_form_and_eval_is_the_identity(self):
        drop = gyrodrop.DropBlock3d(0.2, 3, seed=4)
        x = torch.ones(2, 3, 4, 8, 8)
        for step in range(3):
            assert torch.equal(drop(x), dropblock3d(x, 0.2, 3, step=step, seed=4))
        assert drop.eval()(x) is x

    def test_is_a_dropblock2d_as_in_torchvision(self):
        assert isinstance(gyrodrop.DropBlock3d(), gyrodrop.DropBlock2d)
        assert gyrodrop.DropBlock3d.spatial_dims == 3

    def test_warmup_ramps_p_from_zero(self):
        drop = gyrodrop.DropBlock3d(0.4, 3, warmup_steps=4)
        assert [drop.rate(s) for s in (0, 2, 4, 9)] == [0.0, 0.2, 0.4, 0.4]

    @pytest.mark.parametrize(
        ("shape", "message"),
        [
            ((2, 3, 8, 8), r"DropBlock3d: input must have shape \(B, C, D, H, W\), got"),
            ((2, 3, 8), r"DropBlock3d: input must have shape \(B, C, D, H, W\)"),
        ],
    )
    def test_an_input_that_is_not_a_volume_is_refused_with_a_hint(self, shape, message):
        with pytest.raises(ValueError, match=message) as err:
            gyrodrop.DropBlock3d(0.1, 3)(torch.ones(shape))
        assert "DropBlock2d for (B, C, H, W)" in str(err.value)

    def test_the_2d_layer_points_to_the_3d_one_for_volumes(self):
        with pytest.raises(ValueError, match=r"DropBlock3d for \(B, C, D, H, W\)"):
            gyrodrop.DropBlock2d(0.1, 3)(torch.ones(2, 3, 4, 8, 8))

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda: gyrodrop.DropBlock3d(1.0), r"DropBlock3d: p must be in \[0, 1\), got 1.0"),
            (lambda: gyrodrop.DropBlock3d(0.1, 0), r"DropBlock3d: block_size must be >= 1"),
            (lambda: gyrodrop.GyroDropBlock3d(0.1, 3, 0), r"GyroDropBlock3d: num_subnets"),
            (
                lambda: dropblock3d(torch.ones(1, 1, 2, 2, 2), 0.1, 3, step=0, scale="x"),
                r"dropblock3d: scale must be one of",
            ),
        ],
    )
    def test_bad_arguments_are_refused_naming_them(self, make, message):
        with pytest.raises(ValueError, match=message):
            make()


class TestGyroDropBlock3d:
    def make(self, **kw):
        return gyrodrop.GyroDropBlock3d(0.3, 3, 8, 2, steps_per_set=2, seed=6, **kw)

    def test_rows_of_a_group_share_a_mask_and_groups_differ(self):
        y = self.make()(torch.ones(4, 2, 4, 8, 8))
        assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])
        assert not torch.equal(y[0], y[2])

    def test_the_active_masks_are_the_subnetworks_masks(self):
        layer = self.make()
        x = torch.ones(4, 2, 4, 8, 8)
        y = layer(x)
        active = layer.active_masks(x, 0)
        assert torch.equal(y[0], active[0]) and torch.equal(y[2], active[1])
        ks = [k for k in range(8) if torch.equal(layer.subnet_mask(k, x), active[0])]
        assert len(ks) == 1

    def test_module_equals_the_functional_form(self):
        layer = self.make()
        x = torch.rand(4, 2, 3, 7, 7)
        for step in range(4):
            ref = gyro_dropblock3d(
                x, 0.3, 3, step=step, seed=6, num_subnets=8, subnets_per_step=2, steps_per_set=2
            )
            assert torch.equal(layer(x), ref)

    def test_eval_is_the_identity(self):
        x = torch.randn(2, 3, 4, 6, 6)
        assert self.make().eval()(x) is x

    def test_subnet_ensemble_predict_averages_its_masks(self):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1),
            gyrodrop.GyroDropBlock3d(0.3, 2, 4, 2, steps_per_set=1),
            nn.Flatten(),
            nn.Linear(2 * 4 * 6 * 6, 3),
        )
        pred = gyrodrop.subnet_ensemble_predict(net, torch.randn(5, 1, 4, 6, 6))
        assert pred.mean.shape == (5, 3)


class TestSurgery:
    def net(self):
        return nn.Sequential(
            nn.Conv3d(1, 4, 3), nn.Dropout3d(0.2), nn.Conv2d(4, 4, 1), nn.Dropout2d(0.1)
        )

    @pytest.mark.parametrize("gyro", [False, True])
    def test_apply_dropblock_converts_dropout3d_and_remove_puts_it_back(self, gyro):
        net = self.net()
        keys = list(net.state_dict())
        kw = {"gyro": True, "steps_per_set": 1, "num_subnets": 4, "subnets_per_step": 2}
        assert gyrodrop.apply_dropblock(net, block_size=3, **(kw if gyro else {})) == 2
        three, two = (
            (gyrodrop.GyroDropBlock3d, gyrodrop.GyroDropBlock2d)
            if gyro
            else (
                gyrodrop.DropBlock3d,
                gyrodrop.DropBlock2d,
            )
        )
        assert type(net[1]) is three and type(net[3]) is two
        assert net[1].p == 0.2 and net[3].p == 0.1
        assert gyrodrop.remove_gyro_dropout(net) == 2
        assert type(net[1]) is nn.Dropout3d and type(net[3]) is nn.Dropout2d
        assert list(net.state_dict()) == keys
