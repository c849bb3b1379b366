"""Properties of the subnetwork schedule and the step counting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop.schedule import SubnetSchedule, resolve_steps_per_set

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

    def test_step_and_seed_are_restored_from_a_checkpoint(self):
        a = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=5)
        gyrodrop.step(a, 7)
        b = gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=0)
        b.load_state_dict(a.state_dict())
        assert (int(b.step), int(b.seed)) == (7, 5)
        x = torch.ones(4, 64)
        assert torch.equal(a(x), b(x))


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
