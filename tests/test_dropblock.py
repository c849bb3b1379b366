"""DropBlock2d and GyroDropBlock2d: drop rates, block shapes, scaling, schedule, resume."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

import gyrodrop
from gyrodrop.dropblock import (
    drop_probabilities,
    dropblock2d,
    gyro_dropblock2d,
    seed_rate,
)


def dropped(y):
    """Dropped pixels (bool) of an output computed from a positive input."""
    return y == 0


def is_union_of_blocks(drop, block_size):
    """Is every dropped pixel of ``drop`` (N, H, W) inside a fully dropped
    ``bh x bw`` square that fits in the map? (Opening by the square is the identity.)"""
    h, w = drop.shape[-2:]
    bh, bw = min(block_size, h), min(block_size, w)
    d = drop.to(torch.float32).unsqueeze(1)
    full = -F.max_pool2d(-d, (bh, bw), stride=1)  # 1 where the square at (a, b) is all dropped
    grown = F.max_pool2d(F.pad(full, (bw - 1, bw - 1, bh - 1, bh - 1)), (bh, bw), stride=1)
    return bool(torch.equal(grown, d))


def binomial_ok(k, n, q, alpha=1e-6):
    """Is ``k`` drops of ``n`` inside the two-sided ``1 - alpha`` binomial interval?"""
    lo, hi = binom.ppf(alpha / 2, n, q), binom.isf(alpha / 2, n, q)
    return lo <= k <= hi


class TestSeedRate:
    def test_paper_formula(self):
        assert seed_rate(0.1, 7, 14, 14) == pytest.approx(0.1 / 49 * 196 / 64)

    def test_block_larger_than_map_is_clamped(self):
        # a 5x5 block on a 3x4 map is a 3x4 block with one position
        assert seed_rate(0.2, 5, 3, 4) == pytest.approx(0.2)

    def test_expected_drop_fraction_is_close_to_p_for_small_blocks(self):
        assert drop_probabilities(0.1, 3, 32, 32).mean().item() == pytest.approx(0.1, abs=0.01)


class TestDropBlock2dRates:
    @given(
        p=st.sampled_from([0.05, 0.2, 0.5]),
        block_size=st.integers(1, 6),
        h=st.integers(1, 12),
        w=st.integers(1, 12),
        seed=st.integers(0, 2**40),
        step=st.integers(0, 1000),
        shared=st.booleans(),
    )
    @settings(max_examples=40, deadline=None)
    def test_each_pixel_is_dropped_with_its_exact_probability(
        self, p, block_size, h, w, seed, step, shared
    ):
        # masks of different rows/channels are independent: pixel (i, j) is dropped in a
        # Binomial(n, q_ij) number of them
        n_rows, channels = 300, 4
        y = dropblock2d(
            torch.ones(n_rows, channels, h, w),
            p,
            block_size,
            seed=seed,
            step=step,
            shared_channels=shared,
        )
        q = drop_probabilities(p, block_size, h, w)
        d = dropped(y)[:, :1] if shared else dropped(y)
        n = d.shape[0] * d.shape[1]
        counts = d.sum(dim=(0, 1))
        for i, j in {(0, 0), (h // 2, w // 2), (h - 1, w - 1)}:
            assert binomial_ok(int(counts[i, j]), n, float(q[i, j])), (i, j)

    @given(
        p=st.sampled_from([0.1, 0.3]),
        block_size=st.integers(1, 7),
        h=st.integers(1, 16),
        w=st.integers(1, 16),
        seed=st.integers(0, 2**31),
    )
    @settings(max_examples=40, deadline=None)
    def test_dropped_pixels_form_whole_blocks(self, p, block_size, h, w, seed):
        y = gyrodrop.DropBlock2d(p, block_size, seed=seed)(torch.ones(6, 3, h, w))
        assert is_union_of_blocks(dropped(y).reshape(-1, h, w), block_size)

    def test_inverted_scaling_is_unbiased_per_pixel(self):
        y = dropblock2d(torch.ones(4000, 1, 9, 9), 0.3, 3, step=0, seed=3)
        mean = y.mean(dim=(0, 1))
        # a kept pixel is 1 / P(keep), so E[y] = 1; 4000 draws: standard error < 0.02
        assert torch.allclose(mean, torch.ones(9, 9), atol=0.1)

    def test_realized_scaling_preserves_each_masks_sum(self):
        x = torch.ones(8, 5, 11, 13)
        y = dropblock2d(x, 0.3, 4, step=2, scale="realized")
        sums = y.sum(dim=(2, 3))
        kept_any = (y != 0).any(dim=3).any(dim=2)
        assert torch.allclose(sums[kept_any], torch.full_like(sums[kept_any], 11 * 13.0))

    def test_shared_channels_gives_one_mask_for_all_channels(self):
        y = dropblock2d(torch.ones(3, 6, 10, 10), 0.3, 3, step=0, shared_channels=True)
        assert torch.equal(dropped(y), dropped(y[:, :1]).expand_as(y))

    def test_per_channel_masks_differ_across_channels(self):
        y = dropblock2d(torch.ones(2, 6, 10, 10), 0.3, 3, step=0)
        assert not torch.equal(dropped(y[:, 0]), dropped(y[:, 1]))


class TestDropBlock2dModule:
    def test_eval_is_the_identity(self):
        x = torch.randn(2, 3, 8, 8)
        drop = gyrodrop.DropBlock2d(0.5, 3).eval()
        assert drop(x) is x
        assert int(drop.step) == 0

    def test_p_zero_is_the_identity_and_still_steps(self):
        drop = gyrodrop.DropBlock2d(0.0, 3)
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(drop(x), x)
        assert int(drop.step) == 1

    def test_module_equals_the_functional_form(self):
        drop = gyrodrop.DropBlock2d(0.2, 3, seed=5)
        x = torch.randn(4, 2, 9, 9)
        for step in range(3):
            expected = dropblock2d(x, 0.2, 3, step=step, seed=5)
            assert torch.equal(drop(x), expected)

    def test_masks_change_every_step(self):
        drop = gyrodrop.DropBlock2d(0.3, 3)
        x = torch.ones(2, 2, 12, 12)
        assert not torch.equal(drop(x), drop(x))

    def test_a_rows_mask_does_not_depend_on_the_rest_of_the_batch(self):
        x = torch.ones(6, 2, 10, 10)
        full = dropblock2d(x, 0.3, 3, step=4, seed=1)
        head = dropblock2d(x[:2], 0.3, 3, step=4, seed=1)
        assert torch.equal(full[:2], head)

    def test_state_dict_resumes_the_exact_mask_sequence(self):
        x = torch.ones(3, 2, 10, 10)
        a = gyrodrop.DropBlock2d(0.3, 3, seed=7)
        for _ in range(5):
            a(x)
        b = gyrodrop.DropBlock2d(0.3, 3, seed=0)
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))

    def test_manual_stepping_keeps_the_mask_until_step(self):
        drop = gyrodrop.DropBlock2d(0.3, 3, auto_step=False)
        x = torch.ones(2, 2, 12, 12)
        first = drop(x)
        assert torch.equal(first, drop(x))
        gyrodrop.step(drop)
        assert not torch.equal(first, drop(x))

    def test_warmup_ramps_p_linearly_from_zero(self):
        drop = gyrodrop.DropBlock2d(0.4, 3, warmup_steps=10)
        assert drop.rate(0) == 0.0
        assert drop.rate(5) == pytest.approx(0.2)
        assert drop.rate(10) == drop.rate(99) == 0.4
        x = torch.ones(2, 2, 8, 8)
        assert torch.equal(drop(x), x)  # step 0: rate 0

    def test_gradient_is_the_mask(self):
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        y = dropblock2d(x, 0.3, 3, step=1)
        y.sum().backward()
        assert torch.equal(x.grad, dropblock2d(torch.ones_like(x), 0.3, 3, step=1))

    def test_half_precision_input_keeps_its_dtype(self):
        y = gyrodrop.DropBlock2d(0.3, 3)(torch.ones(2, 2, 8, 8, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16

    def test_repr_lists_the_hyperparameters(self):
        assert "block_size=5" in repr(gyrodrop.DropBlock2d(0.1, 5, warmup_steps=3))

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"p": 1.0}, "DropBlock2d: p must be in"),
            ({"block_size": 0}, "DropBlock2d: block_size must be >= 1"),
            ({"scale": "paper"}, "DropBlock2d: scale must be one of"),
            ({"shared_channels": 1}, "DropBlock2d: shared_channels must be a bool"),
            ({"warmup_steps": -1}, "DropBlock2d: warmup_steps must be >= 0"),
        ],
    )
    def test_bad_arguments_are_refused_at_construction(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            gyrodrop.DropBlock2d(**kwargs)

    def test_non_4d_input_is_refused_with_a_hint(self):
        with pytest.raises(ValueError, match=r"\(B, C, H, W\), got \(2, 8\)"):
            gyrodrop.DropBlock2d(0.1, 3)(torch.ones(2, 8))


class TestGyroDropBlock2d:
    def make(self, **kw):
        kw.setdefault("steps_per_set", 3)
        return gyrodrop.GyroDropBlock2d(0.3, 3, 8, 2, **kw)

    def test_rows_of_a_group_share_a_mask_and_groups_differ(self):
        y = self.make()(torch.ones(6, 2, 10, 10))
        assert torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])
        assert torch.equal(y[3], y[5])
        assert not torch.equal(y[0], y[3])

    def test_only_sigma_distinct_masks_over_many_steps(self):
        drop = gyrodrop.GyroDropBlock2d(0.3, 3, 5, 1, steps_per_set=1)
        x = torch.ones(1, 1, 10, 10)
        seen = {tuple(drop(x).flatten().tolist()) for _ in range(40)}
        assert len(seen) == 5

    def test_set_stays_for_steps_per_set_steps(self):
        drop = self.make(steps_per_set=4)
        x = torch.ones(4, 2, 10, 10)
        outs = [drop(x) for _ in range(8)]
        assert all(torch.equal(outs[0], o) for o in outs[1:4])
        assert not torch.equal(outs[3], outs[4])

    @given(seed=st.integers(0, 2**31), h=st.integers(2, 14), block_size=st.integers(1, 5))
    @settings(max_examples=30, deadline=None)
    def test_every_subnet_mask_is_a_dropblock_mask(self, seed, h, block_size):
        drop = gyrodrop.GyroDropBlock2d(0.3, block_size, 16, 4, steps_per_set=1, seed=seed)
        like = torch.ones(1, 3, h, h + 1)
        m = torch.stack([drop.subnet_mask(k, like) for k in range(16)])
        assert is_union_of_blocks((m == 0).reshape(-1, h, h + 1), block_size)

    def test_drop_rate_over_subnets_follows_the_paper_gamma(self):
        drop = gyrodrop.GyroDropBlock2d(0.2, 3, 400, 4, steps_per_set=1)
        like = torch.ones(1, 4, 9, 9)
        m = torch.stack([drop.subnet_mask(k, like) for k in range(400)])  # (400, 4, 9, 9)
        q = drop_probabilities(0.2, 3, 9, 9)
        counts = (m == 0).sum(dim=(0, 1))
        assert binomial_ok(int(counts[4, 4]), 1600, float(q[4, 4]))
        assert binomial_ok(int(counts[0, 0]), 1600, float(q[0, 0]))

    def test_module_equals_the_functional_form(self):
        drop = self.make(seed=3)
        x = torch.randn(5, 2, 9, 9)
        for step in range(5):
            expected = gyro_dropblock2d(
                x, 0.3, 3, step=step, seed=3, num_subnets=8, subnets_per_step=2, steps_per_set=3
            )
            assert torch.equal(drop(x), expected)

    def test_state_dict_resumes_the_exact_mask_sequence(self):
        x = torch.ones(4, 2, 10, 10)
        a = self.make(seed=9)
        for _ in range(7):
            a(x)
        b = self.make(seed=0)
        b.load_state_dict(a.state_dict())
        assert all(torch.equal(a(x), b(x)) for _ in range(4))

    def test_eval_is_the_identity(self):
        x = torch.randn(2, 3, 8, 8)
        assert self.make().eval()(x) is x

    def test_subnet_ensemble_predict_averages_its_masks(self):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            gyrodrop.GyroDropBlock2d(0.3, 3, 4, 2, steps_per_set=1),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 8 * 8, 3),
        )
        pred = gyrodrop.subnet_ensemble_predict(net, torch.randn(5, 1, 8, 8))
        assert pred.mean.shape == (5, 3)
        assert torch.allclose(pred.mean.sum(dim=1), torch.ones(5))

    def test_bad_num_subnets_is_refused(self):
        with pytest.raises(ValueError, match="GyroDropBlock2d: subnets_per_step must be in"):
            gyrodrop.GyroDropBlock2d(0.1, 3, 2, 4, steps_per_set=1)


def _drop_bits_digest(mask: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of a mask's packed drop bits (row-major)."""
    bits = np.packbits((mask == 0).flatten().numpy()).tobytes()
    return hashlib.sha256(bits).hexdigest()[:16]


class TestGyroDropBlock2dSubnetworkStreams:
    """Every one of sigma subnetworks has its own mask, for any sigma up to 2**62 and any
    channel count, and the masks of 0.1.x (stream ids below 2**32) keep their bits."""

    @pytest.mark.parametrize("channels", [1, 2, 3, 4, 7, 64, 1000])
    @pytest.mark.parametrize("shift", [2**32, 2**64])
    @pytest.mark.parametrize("dims", [2, 3])
    def test_streams_that_agree_in_their_low_32_bits_get_distinct_masks(
        self, channels, shift, dims
    ):
        """(The right value of shared/cases/round3/case_gyro_dropblock_high_sigma.py.)"""
        # Subnetwork k, channel c is stream k * C + c; stream s + shift lands on
        # (k2, c2) = divmod(s + shift, C), which only the high bits tell apart.
        layer = gyrodrop.GyroDropBlock2d if dims == 2 else gyrodrop.GyroDropBlock3d
        drop = layer(0.5, 3, 2**62, 4, steps_per_set=1, seed=3)
        like = torch.ones(1, channels, *([16, 16] if dims == 2 else [6, 8, 8]))
        for k in (0, 1, 12345):
            for c in sorted({0, channels - 1}):
                k2, c2 = divmod(k * channels + c + shift, channels)
                if k2 >= 2**62:
                    continue
                a = drop.subnet_mask(k, like)[c]
                b = drop.subnet_mask(k2, like)[c2]
                assert not torch.equal(a, b), (k, c, k2, c2)

    def test_high_subnetworks_of_an_active_set_differ_from_low_ones(self):
        # The training path (active_masks) draws through the same streams.
        drop = gyrodrop.GyroDropBlock2d(0.5, 3, 2**40, 2, steps_per_set=1, seed=1)
        like = torch.ones(2, 4, 16, 16)
        masks_ = drop.active_masks(like, step=0)
        ids = drop.active_subnets(0).tolist()
        for m, k in zip(masks_, ids, strict=True):
            assert torch.equal(m, drop.subnet_mask(k, like))
            assert not torch.equal(m, drop.subnet_mask(k % (2**32 // 4), like))

    #: Digests of masks drawn by 0.1.x (ids whose streams k * C + c are below 2**32).
    GOLDEN = {
        1: ([0, 1, 2**31, 2**32 - 1],
            "b72673a260a31e8c d1422da89328ee12 3099b599aa1f52fa 88951e2715899c8a"),
        3: ([0, 1, 2**32 // 3 - 1], "61427b4742e11600 0a7e1b52017cf8c4 ada05ac9505923c5"),
        4: ([0, 1, 2**32 // 4 - 1], "8c0c0d86adb654d5 965e21dacd84c9dd 6fb691bd922027bc"),
        64: ([0, 1, 2**32 // 64 - 1], "72ce27ba96d48721 fb25e21d2f63f352 3ed951afd8fc08f9"),
    }  # fmt: skip

    @pytest.mark.parametrize("channels", sorted(GOLDEN))
    def test_masks_below_two_to_the_32_streams_keep_the_bits_of_0_1(self, channels):
        ids, digests = self.GOLDEN[channels]
        drop = gyrodrop.GyroDropBlock2d(0.3, 3, 2**40, 4, steps_per_set=1, seed=7)
        like = torch.ones(1, channels, 9, 9)
        assert [_drop_bits_digest(drop.subnet_mask(k, like)) for k in ids] == digests.split()

    def test_dropblock2d_masks_keep_the_bits_of_0_1(self):
        drop = gyrodrop.DropBlock2d(0.3, 3, seed=5, auto_step=False)
        drop.set_step(11)
        assert _drop_bits_digest(drop(torch.ones(6, 5, 9, 9))) == "f945dea7dabb3bef"


class TestEmptyFeatureMaps:
    """An empty map (H or W = 0, or no rows / channels) comes back empty, as
    ``nn.Dropout2d`` does (shared/cases/round3/case_dropblock_empty_map.py)."""

    SHAPES = [(2, 3, 0, 8), (2, 3, 8, 0), (2, 3, 0, 0), (0, 3, 8, 8), (2, 0, 8, 8)]

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize(
        "layer",
        [
            lambda: gyrodrop.DropBlock2d(0.3, 3),
            lambda: gyrodrop.DropBlock2d(0.3, 3, shared_channels=True, scale="realized"),
            lambda: gyrodrop.GyroDropBlock2d(0.3, 3, 8, 2, steps_per_set=1),
            lambda: gyrodrop.GyroDropBlock2d(0.3, 7, 8, 2, steps_per_set=1, scale="realized"),
        ],
    )
    def test_modules_return_the_empty_tensor_like_dropout2d(self, layer, shape):
        x = torch.randn(shape)
        assert layer()(x).shape == torch.nn.Dropout2d(0.3)(x).shape == shape

    @pytest.mark.parametrize("shape", SHAPES)
    def test_functionals_return_the_empty_tensor(self, shape):
        x = torch.randn(shape)
        assert dropblock2d(x, 0.3, 3, step=0).shape == shape
        assert gyro_dropblock2d(x, 0.3, 3, step=0, num_subnets=8, subnets_per_step=2).shape == shape

    def test_empty_maps_have_no_seed_rate_and_no_drop_probabilities(self):
        assert seed_rate(0.3, 3, 0, 8) == 0.0 and seed_rate(0.3, 3, 8, 0) == 0.0
        assert drop_probabilities(0.3, 3, 0, 8).shape == (0, 8)

    def test_gyro_masks_of_an_empty_map_are_empty(self):
        drop = gyrodrop.GyroDropBlock2d(0.3, 3, 8, 2, steps_per_set=1)
        like = torch.ones(4, 3, 0, 5)
        assert drop.active_masks(like, step=0).shape == (2, 3, 0, 5)
        assert drop.subnet_mask(1, like).shape == (3, 0, 5)
