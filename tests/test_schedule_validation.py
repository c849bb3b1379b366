"""Validation shared by the modules and the functional forms, subnetwork indices, huge
sigma at O(tau) per set change, and the hyperparameters kept with checkpoints."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop import masks
from gyrodrop.gyro import gyro_dropout
from gyrodrop.schedule import TRAINER_SCHEDULED, SubnetSchedule

BASE = {"p": 0.5, "num_subnets": 16, "subnets_per_step": 4}

BAD = [
    ({"p": -0.1}, "p must be in [0, 1), got -0.1"),
    ({"p": 1.5}, "p must be in [0, 1), got 1.5"),
    ({"p": "0.5"}, "p must be a float in [0, 1), got '0.5'"),
    ({"p": True}, "p must be a float in [0, 1), got True"),
    ({"num_subnets": 0}, "num_subnets must be >= 1, got 0"),
    ({"num_subnets": 2**63}, "num_subnets must be <= 2**62"),
    ({"num_subnets": 4.0}, "num_subnets must be an int, got 4.0"),
    ({"subnets_per_step": 17}, "subnets_per_step must be in [1, 16], got 17"),
    (
        {"schedule": "foo"},
        "schedule must be one of ('consecutive', 'random', 'replacement'), got 'foo'",
    ),
    ({"scale": "foo"}, "scale must be one of ('inverted', 'realized'), got 'foo'"),
    ({"dims": (0,)}, "dims must name non-batch dims"),
    ({"dims": "x"}, "dims must be None, an int or a tuple of ints, got 'x'"),
    ({"seed": -1}, "seed must be in [0, 9223372036854775807], got -1"),
    ({"schedule_seed": -1}, "schedule_seed must be in [0, 9223372036854775807], got -1"),
]


class TestFunctionalValidatesLikeTheModule:
    @pytest.mark.parametrize(("bad", "message"), BAD)
    @pytest.mark.parametrize("training", [True, False])
    def test_same_error_as_the_module(self, bad, message, training):
        kwargs = {**BASE, **bad}
        with pytest.raises(ValueError, match=re.escape(f"GyroDropout: {message}")):
            gyrodrop.GyroDropout(**kwargs, steps_per_set=1)
        with pytest.raises(ValueError, match=re.escape(f"gyro_dropout: {message}")):
            gyro_dropout(torch.ones(8, 16), **kwargs, step=0, training=training)

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ({"step": -1}, "step must be >= 0, got -1"),
            ({"step": 1.5}, "step must be an int, got 1.5"),
            ({"steps_per_set": 0}, "steps_per_set must be >= 1, got 0"),
            ({"training": 1}, "training must be a bool, got 1"),
        ],
    )
    def test_functional_only_arguments(self, bad, message):
        kwargs = {**BASE, "step": 0, **bad}
        with pytest.raises(ValueError, match=re.escape(f"gyro_dropout: {message}")):
            gyro_dropout(torch.ones(8, 16), **kwargs)

    @given(
        st.integers(0, 40),
        st.sampled_from(["consecutive", "random"]),
        st.sampled_from(["inverted", "realized"]),
    )
    @settings(max_examples=20, deadline=None)
    def test_functional_equals_the_module_at_every_step(self, step, schedule, scale):
        drop = gyrodrop.GyroDropout(
            0.3, 16, 4, steps_per_set=3, schedule=schedule, scale=scale, seed=7, auto_step=False
        )
        drop.step.fill_(step)
        x = torch.randn(8, 16)
        ref = gyro_dropout(
            x,
            0.3,
            step=step,
            seed=7,
            num_subnets=16,
            subnets_per_step=4,
            steps_per_set=3,
            schedule=schedule,
            scale=scale,
        )
        assert torch.equal(drop(x), ref)

    def test_functional_rejects_a_zero_dim_input_even_at_p_zero(self):
        with pytest.raises(ValueError, match="input must have a batch dim"):
            gyro_dropout(torch.tensor(1.0), 0.0, step=0, num_subnets=4, subnets_per_step=2)


class TestSubnetMaskIndex:
    @pytest.mark.parametrize("k", [-1, 16, 999, 1.0, True])
    def test_gyro_dropout_subnet_mask_needs_a_valid_k(self, k):
        drop = gyrodrop.GyroDropout(0.5, 16, 4, total_steps=100)
        with pytest.raises(ValueError, match=r"GyroDropout: k must be"):
            drop.subnet_mask(k, torch.ones(2, 8))

    @pytest.mark.parametrize("k", [-1, 16, 999])
    def test_block_gyro_subnet_mask_needs_a_valid_k(self, k):
        layer = gyrodrop.BlockGyroLinear(
            16, 4, p=0.5, num_subnets=16, block_size=4, total_steps=100
        )
        with pytest.raises(ValueError, match=r"BlockGyroLinear: k must be in \[0, 15\]"):
            layer.subnet_mask(k)

    def test_every_valid_k_gives_the_mask_the_schedule_trains(self):
        drop = gyrodrop.GyroDropout(0.5, 16, 4, steps_per_set=1, seed=3)
        like = torch.ones(4, 8)
        active = drop.active_subnets()
        group = drop.active_masks(like)
        for g, k in enumerate(active.tolist()):
            assert torch.equal(drop.subnet_mask(k, like), group[g])


class TestHugeSigma:
    def test_sigma_2_pow_40_trains_at_o_tau(self):
        drop = gyrodrop.GyroDropout(0.5, num_subnets=2**40, subnets_per_step=4, steps_per_set=1)
        ids = set()
        for _ in range(5):
            y = drop(torch.ones(8, 8))
            assert y.shape == (8, 8)
            ids.update(drop.active_subnets(drop.current_step() - 1).tolist())
        assert len(ids) == 20 and all(0 <= i < 2**40 for i in ids)

    @pytest.mark.parametrize("schedule", ["consecutive", "random"])
    def test_block_gyro_and_random_schedule_with_huge_sigma(self, schedule):
        layer = gyrodrop.BlockGyroLinear(
            16, 4, p=0.5, num_subnets=2**50, block_size=4, steps_per_set=1, schedule=schedule
        )
        assert layer(torch.randn(4, 16)).shape == (4, 4)
        assert layer.subnet_mask(2**50 - 1).shape == (16,)

    def test_sigma_at_the_threshold_keeps_the_0_1_0_ids(self):
        sigma = masks.SORTED_PERMUTATION_MAX
        sched = SubnetSchedule(sigma, 8, steps_per_set=1)
        perm = masks.seeded_permutation(5, masks.TAG_PERM, 0, sigma)
        assert torch.equal(sched.subnets(5, 3), perm[24:32])
        rnd = SubnetSchedule(sigma, 8, 1, "random")
        expected = masks.seeded_permutation(5, masks.TAG_RANDOM_SET, 3, sigma)[:8]
        assert torch.equal(rnd.subnets(5, 3), expected)

    @given(st.integers(1, 3000), st.integers(0, 2**32), st.integers(0, 5))
    @settings(max_examples=40, deadline=None)
    def test_feistel_permutation_is_a_bijection(self, n, seed, counter):
        values = masks.feistel_permutation(seed, masks.TAG_PERM, counter, n, torch.arange(n))
        assert torch.equal(values.sort().values, torch.arange(n))

    @given(st.integers(2**20 + 1, 2**62), st.integers(0, 2**32))
    @settings(max_examples=30, deadline=None)
    def test_feistel_values_are_in_range_and_distinct(self, n, seed):
        index = torch.arange(min(n, 64))
        values = masks.feistel_permutation(seed, masks.TAG_PERM, 0, n, index)
        assert values.unique().numel() == len(index)
        assert int(values.min()) >= 0 and int(values.max()) < n

    @given(st.integers(2**20 + 1, 2**24), st.integers(1, 16), st.integers(0, 100))
    @settings(max_examples=30, deadline=None)
    def test_consecutive_sets_above_the_threshold_are_a_stream_of_bijections(
        self, sigma, tau, set_index
    ):
        sched = SubnetSchedule(sigma, tau, steps_per_set=1)
        first = set_index * tau
        expected = [
            int(
                masks.feistel_permutation(
                    0, masks.TAG_PERM, p // sigma, sigma, torch.tensor([p % sigma])
                )[0]
            )
            for p in range(first, first + tau)
        ]
        assert sched.subnets(0, set_index).tolist() == expected

    def test_sets_spanning_two_cycles_above_the_threshold(self):
        sigma = 2**20 + 3
        sched = SubnetSchedule(sigma, 16, steps_per_set=1)
        set_index = sigma // 16  # starts 16 * set_index, crosses sigma
        ids = sched.subnets(0, set_index)
        assert ids.shape == (16,) and int(ids.max()) < sigma

    def test_ids_of_2_pow_32_and_more_get_their_own_masks(self):
        k = torch.tensor([5, 5 + 2**32, 5 + 2**33])
        keep = masks.element_keep_mask(0, k, 256, 0.5)
        assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[1], keep[2])

    @given(st.integers(0, 2**32 - 1))
    @settings(max_examples=30, deadline=None)
    def test_ids_below_2_pow_32_keep_their_0_1_0_bases(self, k):
        key = masks.mix_keys(3, masks.TAG_ELEMENT)
        old = masks.hash_u32((torch.tensor([k]) * 0x2545F491 + key) & 0xFFFFFFFF).unsqueeze(1)
        assert torch.equal(masks._subnet_bases(3, masks.TAG_ELEMENT, torch.tensor([k])), old)


def saved(**kw) -> dict:
    a = gyrodrop.GyroDropout(**{**BASE, "steps_per_set": 1, **kw})
    for _ in range(5):
        a(torch.ones(8, 32))
    return a.state_dict()


class TestCheckpointHyperparameters:
    def test_loading_other_settings_warns_naming_each_difference(self):
        sd = saved()
        b = gyrodrop.GyroDropout(0.2, num_subnets=8, subnets_per_step=2, steps_per_set=1)
        with pytest.warns(UserWarning) as record:
            b.load_state_dict(sd, strict=True)
        message = str(record[0].message)
        for part in (
            "num_subnets=16 (this layer: 8)",
            "subnets_per_step=4 (this layer: 2)",
            "p=0.5 (this layer: 0.2)",
        ):
            assert part in message
        assert b.current_step() == 5

    @pytest.mark.parametrize(
        ("other", "named"),
        [
            ({"steps_per_set": 2}, "steps_per_set=1"),
            ({"schedule": "random"}, "schedule="),
            ({"scale": "realized"}, "scale="),
            ({"dims": (1,)}, "dims=None"),
        ],
    )
    def test_each_setting_is_checked(self, other, named):
        b = gyrodrop.GyroDropout(**{**BASE, "steps_per_set": 1, **other})
        with pytest.warns(UserWarning, match=re.escape(named)):
            b.load_state_dict(saved())

    def test_same_settings_load_silently(self):
        b = gyrodrop.GyroDropout(**BASE, steps_per_set=1, seed=9)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b.load_state_dict(saved())

    def test_a_0_1_0_checkpoint_without_hyperparameters_loads_silently_and_strictly(self):
        sd = saved()
        del sd["_extra_state"]
        b = gyrodrop.GyroDropout(0.2, num_subnets=8, subnets_per_step=2, steps_per_set=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = b.load_state_dict(sd, strict=True)
        assert not result.missing_keys and b.current_step() == 5

    def test_the_warning_names_the_layer_inside_a_model(self):
        def net(p):
            model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gyrodrop.apply_gyro_dropout(
                    model, num_subnets=8, subnets_per_step=2, steps_per_set=1
                )
            return model

        with pytest.warns(UserWarning, match=r"GyroDropout '1': .*p=0.5 \(this layer: 0.25\)"):
            net(0.25).load_state_dict(net(0.5).state_dict())

    def test_block_gyro_linear_block_size_and_prune(self):
        def make(**kw):
            return gyrodrop.BlockGyroLinear(16, 16, p=0.5, num_subnets=8, steps_per_set=1, **kw)

        sd = make(block_size=4).state_dict()
        with pytest.warns(UserWarning, match=r"block_size=4 \(this layer: 8\)"):
            make(block_size=8).load_state_dict(sd)
        with pytest.warns(UserWarning, match=r"prune='input' \(this layer: 'output'\)"):
            make(block_size=4, prune="output").load_state_dict(sd)

    def test_stochastic_depth_mode(self):
        sd = gyrodrop.StochasticDepth(0.5, "block").state_dict()
        with pytest.warns(UserWarning, match=r"mode='block' \(this layer: 'sample'\)"):
            gyrodrop.StochasticDepth(0.5, "sample").load_state_dict(sd)

    def test_trainer_scheduled_layers_skip_steps_per_set(self):
        b = gyrodrop.GyroDropout(**BASE, steps_per_set=7)
        setattr(b, TRAINER_SCHEDULED, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b.load_state_dict(saved())

    def test_the_state_survives_torch_save_with_weights_only(self, tmp_path):
        torch.save(saved(), tmp_path / "ckpt.pt")
        sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        b = gyrodrop.GyroDropout(0.2, num_subnets=16, subnets_per_step=4, steps_per_set=1)
        with pytest.warns(UserWarning, match=r"p=0.5 \(this layer: 0.2\)"):
            b.load_state_dict(sd)

    @given(st.floats(0.0, 0.99), st.integers(1, 64))
    @settings(max_examples=20, deadline=None)
    def test_round_trip_is_exact(self, p, sigma):
        assume(p < 1.0)
        a = gyrodrop.GyroDropout(p, sigma, 1, steps_per_set=1)
        b = gyrodrop.GyroDropout(p, sigma, 1, steps_per_set=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b.load_state_dict(a.state_dict())
