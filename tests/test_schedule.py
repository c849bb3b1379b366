"""Properties of the subnetwork schedule and the step counting."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop.schedule import SubnetSchedule, resolve_steps_per_set
from statcheck import assert_uniform_inclusion

sigma_tau = st.integers(1, 64).flatmap(lambda s: st.tuples(st.just(s), st.integers(1, s)))


class TestConsecutiveSchedule:
    @given(sigma_tau, st.integers(0, 2**32), st.integers(0, 3))
    @settings(max_examples=60, deadline=None)
    def test_every_subnetwork_used_once_per_cycle(self, st_, seed, cycle):
        sigma, tau = st_
        sched = SubnetSchedule(sigma, tau, steps_per_set=1)
        # the stream of sets, concatenated, is one permutation per window of sigma
        n_sets = (cycle + 1) * sigma // tau + 2
        stream = torch.cat([sched.subnets(seed, i) for i in range(n_sets)])
        window = stream[cycle * sigma : (cycle + 1) * sigma]
        assert torch.equal(window.sort().values, torch.arange(sigma))

    @given(sigma_tau, st.integers(1, 7), st.integers(0, 100))
    @settings(max_examples=60, deadline=None)
    def test_set_switches_exactly_every_steps_per_set(self, st_, steps_per_set, step):
        sigma, tau = st_
        sched = SubnetSchedule(sigma, tau, steps_per_set)
        first = step - step % steps_per_set
        assert sched.set_index(step) == step // steps_per_set
        assert torch.equal(sched.at_step(0, step), sched.at_step(0, first))
        assert sched.set_index(first + steps_per_set) == sched.set_index(step) + 1

    @given(sigma_tau, st.integers(0, 50))
    @settings(max_examples=40, deadline=None)
    def test_a_set_holds_tau_valid_ids(self, st_, index):
        sigma, tau = st_
        ids = SubnetSchedule(sigma, tau, 1).subnets(5, index)
        assert ids.shape == (tau,)
        assert bool(((ids >= 0) & (ids < sigma)).all())

    def test_sets_within_a_cycle_are_disjoint_when_tau_divides_sigma(self):
        sched = SubnetSchedule(64, 8, 1)
        sets = [set(sched.subnets(1, i).tolist()) for i in range(8)]
        assert set().union(*sets) == set(range(64))
        assert sum(len(s) for s in sets) == 64

    def test_next_cycle_is_a_new_shuffle(self):
        sched = SubnetSchedule(32, 32, 1)
        assert not torch.equal(sched.subnets(0, 0), sched.subnets(0, 1))

    def test_first_ids_of_consecutive_sets_are_uniform(self):
        # The first row group's subnetwork over 1000 cycles (sigma = 16): each id once
        # per cycle overall, and every id equally likely to come first.
        sched = SubnetSchedule(16, 4, 1)
        firsts = torch.stack([sched.at_step(2, 4 * c)[0] for c in range(1000)])
        counts = torch.bincount(firsts, minlength=16).tolist()
        assert_uniform_inclusion(counts, 1000, 1, "first id of a cycle")


class TestRandomSchedule:
    @given(sigma_tau, st.integers(0, 1000))
    @settings(max_examples=40, deadline=None)
    def test_draws_tau_distinct_subnetworks_every_step(self, st_, step):
        sigma, tau = st_
        ids = SubnetSchedule(sigma, tau, 10, "random").at_step(3, step)
        assert ids.unique().numel() == tau

    def test_changes_every_step_regardless_of_steps_per_set(self):
        sched = SubnetSchedule(256, 4, 100, "random")
        assert sched.set_index(1) == 1
        assert not torch.equal(sched.at_step(0, 0), sched.at_step(0, 1))

    @pytest.mark.parametrize("sigma, tau, steps", [(64, 8, 2000), (10, 3, 1000)])
    def test_every_subnetwork_is_drawn_equally_often(self, sigma, tau, steps):
        # Chi-square on how often each id is in the set. Catches a set drawn from a
        # biased shuffle, or ids that are never drawn.
        sched = SubnetSchedule(sigma, tau, 1, "random")
        ids = torch.cat([sched.at_step(9, s) for s in range(steps)])
        counts = torch.bincount(ids, minlength=sigma).tolist()
        assert_uniform_inclusion(counts, steps, tau, "random-set inclusion")


class TestStepsPerSet:
    @given(st.integers(1, 10**6), sigma_tau)
    def test_derived_from_total_steps(self, total, st_):
        sigma, tau = st_
        assert resolve_steps_per_set("X", sigma, tau, total, None) == max(1, total * tau // sigma)

    def test_neither_given_warns_and_uses_one(self):
        with pytest.warns(UserWarning, match="steps_per_set=1"):
            assert resolve_steps_per_set("X", 8, 2, None, None) == 1

    def test_both_given_is_an_error(self):
        with pytest.raises(ValueError, match="at most one of total_steps and steps_per_set"):
            resolve_steps_per_set("X", 8, 2, 10, 10)

    def test_layers_keep_the_run_length_they_were_given(self):
        # total_steps is public state (trainer callbacks set it, analysis reads it).
        drop = gyrodrop.GyroDropout(0.5, 64, 4, total_steps=1000)
        assert (drop.total_steps, drop.steps_per_set) == (1000, 62)
        assert gyrodrop.GyroDropout(0.5, 64, 4, steps_per_set=7).total_steps is None


class TestStepFunction:
    def test_advances_every_gyro_module_of_a_nested_model(self):
        model = nn.Sequential(
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, auto_step=False),
            nn.Sequential(gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, auto_step=False)),
        )
        gyrodrop.step(model)
        gyrodrop.step(model, 2)
        assert [int(m.step) for m in model.modules() if hasattr(m, "advance")] == [3, 3]

    def test_auto_step_false_forward_does_not_advance(self):
        drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, auto_step=False)
        drop(torch.ones(4, 4))
        drop(torch.ones(4, 4))
        assert int(drop.step) == 0

    def test_auto_step_advances_once_per_training_forward_only(self):
        drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
        drop(torch.ones(4, 4))
        drop.eval()
        drop(torch.ones(4, 4))
        assert int(drop.step) == 1


class TestStateDict:
    def test_checkpoint_from_before_surgery_loads_strictly(self):
        plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        gyro = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        gyrodrop.apply_gyro_dropout(gyro, total_steps=10, seed=3)
        seed = int(gyro[1].seed)
        gyro.load_state_dict(plain.state_dict())  # strict: no missing step/seed error
        assert torch.equal(gyro[0].weight, plain[0].weight)
        assert int(gyro[1].seed) == seed and int(gyro[1].step) == 0

    def test_unexpected_keys_in_a_checkpoint_are_an_error(self):
        # The checkpoint hook must keep strict loading strict.
        drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
        state = drop.state_dict() | {"bogus": torch.zeros(1)}
        with pytest.raises(RuntimeError, match='Unexpected key.*"bogus"'):
            drop.load_state_dict(state)
        drop.load_state_dict(state, strict=False)  # non-strict still loads

    def test_a_buffer_of_the_wrong_shape_is_reported_as_a_load_error(self):
        drop = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1)
        state = drop.state_dict() | {"step": torch.zeros(2, dtype=torch.int64)}
        with pytest.raises(RuntimeError, match="size mismatch for step"):
            drop.load_state_dict(state)

    def test_copies_read_the_step_they_were_copied_with_after_several_writes(self):
        # A copy's buffers are rebuilt at tensor version 1: a host value cached at
        # version 1 in the original (after one in-place write) must not travel with it.
        for module in (
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1),
            gyrodrop.StochasticDepth(0.5),
        ):
            with torch.no_grad():
                module.step.fill_(5)
            assert module.current_step() == 5
            with torch.no_grad():
                module.step.fill_(9)
            for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
                assert clone.current_step() == 9

    def test_step_and_seed_are_restored_from_a_checkpoint(self):
        a = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=5)
        gyrodrop.step(a, 7)
        b = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=0)
        b.load_state_dict(a.state_dict())
        assert (int(b.step), int(b.seed)) == (7, 5)
        x = torch.ones(4, 64)
        assert torch.equal(a(x), b(x))


class TestScheduledModuleArguments:
    @pytest.mark.parametrize("cls", [gyrodrop.GyroDropout, gyrodrop.BlockGyroLinear])
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"seed": -1}, r"seed must be in \[0, 9223372036854775807\], got -1"),
            ({"schedule_seed": 2**63}, r"schedule_seed must be in \[0, 9223372036854775807\]"),
            ({"schedule_seed": 1.5}, r"schedule_seed must be an int, got 1.5"),
            ({"num_subnets": 0}, r"num_subnets must be >= 1, got 0"),
            ({"subnets_per_step": 9}, r"subnets_per_step must be in \[1, 8\], got 9"),
            (
                {"schedule": "cyclic"},
                r"schedule must be one of \('consecutive', 'random', 'replacement'\)",
            ),
            ({"auto_step": 0}, r"auto_step must be a bool, got 0"),
            ({"steps_per_set": 0}, r"steps_per_set must be >= 1, got 0"),
            ({"total_steps": 0}, r"total_steps must be >= 1, got 0"),
        ],
    )
    def test_errors_name_the_layer_and_the_argument(self, cls, kwargs, message):
        args = {"num_subnets": 8, "subnets_per_step": 2, "steps_per_set": 1} | kwargs
        if "total_steps" in kwargs:
            del args["steps_per_set"]
        positional = (16, 4) if cls is gyrodrop.BlockGyroLinear else ()
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: {message}"):
            cls(*positional, **args)


class TestReplacementSchedule:
    @given(sigma_tau, st.integers(0, 2**32), st.integers(0, 50))
    @settings(max_examples=60, deadline=None)
    def test_draws_tau_valid_ids_fixed_for_steps_per_set(self, st_, seed, index):
        sigma, tau = st_
        sched = SubnetSchedule(sigma, tau, steps_per_set=3, schedule="replacement")
        ids = sched.at_step(seed, 3 * index)
        assert ids.shape == (tau,) and ids.dtype == torch.int64
        assert bool(((ids >= 0) & (ids < sigma)).all())
        assert torch.equal(ids, sched.at_step(seed, 3 * index + 2))

    def test_draws_with_replacement_uniformly(self):
        # tau = sigma = 8 over many sets: repeats occur (a permutation would have none)
        # and every id is drawn about equally often
        sched = SubnetSchedule(8, 8, steps_per_set=1, schedule="replacement")
        draws = torch.cat([sched.subnets(7, i) for i in range(2000)])
        sets = draws.view(2000, 8)
        assert any(len(set(s.tolist())) < 8 for s in sets)
        counts = torch.bincount(draws, minlength=8).float()
        assert float(counts.min()) > 0.9 * 2000 and float(counts.max()) < 1.1 * 2000

    def test_different_seeds_give_different_sets(self):
        sched = SubnetSchedule(256, 16, steps_per_set=1, schedule="replacement")
        assert not torch.equal(sched.subnets(1, 0), sched.subnets(2, 0))


class TestStepTensorSchedule:
    @given(
        sigma_tau,
        st.integers(1, 5),
        st.sampled_from(["consecutive", "random", "replacement"]),
        st.integers(0, 2**40),
        st.integers(0, 2**62),
    )
    @settings(max_examples=80, deadline=None)
    def test_at_step_tensor_equals_at_step(self, st_, steps_per_set, schedule, step, seed):
        sigma, tau = st_
        sched = SubnetSchedule(sigma, tau, steps_per_set, schedule)
        got = sched.at_step_tensor(torch.tensor(seed), torch.tensor(step))
        assert torch.equal(got, sched.at_step(seed, step))

    def test_refuses_sigma_above_the_sorted_permutations(self):
        sched = SubnetSchedule(2**21, 4, 1)
        with pytest.raises(ValueError, match="num_subnets <= 2\\*\\*20"):
            sched.at_step_tensor(torch.tensor(0), torch.tensor(0))
