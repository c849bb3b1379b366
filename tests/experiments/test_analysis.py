"""Tests for gyrodrop.experiments.analysis: the diversity analysis compares distinct
subnetworks only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gyrodrop
from gyrodrop.experiments.analysis import diversity, subnetwork_steps
from gyrodrop.experiments.data import Dataset
from gyrodrop.experiments.models import build_model


def _gyro_mlp(sigma: int, tau: int, total: int, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("mlp", (8,), 3, 0.5, widths=(16, 16))
    gyrodrop.apply_gyro_dropout(
        model, num_subnets=sigma, subnets_per_step=tau, total_steps=total, seed=seed
    )
    return model


def _ident(model: torch.nn.Module, step: int, k: int) -> tuple[int, ...]:
    return tuple(
        int(m.active_subnets(step)[k])
        for m in model.modules()
        if isinstance(m, gyrodrop.GyroDropout)
    )


class TestSubnetworkSteps:
    @settings(max_examples=20, deadline=None)
    @given(
        sigma=st.sampled_from([2, 4, 8, 16]),
        tau=st.sampled_from([1, 2, 4]),
        total=st.integers(1, 200),
        count=st.integers(2, 16),
        seed=st.integers(0, 2**16),
    )
    def test_steps_name_distinct_subnetworks_or_raise(
        self, sigma: int, tau: int, total: int, count: int, seed: int
    ) -> None:
        tau = min(tau, sigma)
        model = _gyro_mlp(sigma, tau, total, seed)
        distinct = {_ident(model, s, k) for s in range(total) for k in range(tau)}
        if count > len(distinct):
            with pytest.raises(ValueError, match="distinct subnetworks"):
                subnetwork_steps(model, count)
            return
        steps = subnetwork_steps(model, count)
        assert len(steps) == count and all(0 <= s < total and 0 <= k < tau for s, k in steps)
        assert len({_ident(model, s, k) for s, k in steps}) == count

    def test_a_one_step_run_has_tau_subnetworks(self) -> None:
        assert len(subnetwork_steps(_gyro_mlp(16, 4, total=1), 4)) == 4
        with pytest.raises(ValueError, match="only 4 distinct"):
            subnetwork_steps(_gyro_mlp(16, 4, total=1), 5)

    def test_dropout_models_have_no_steps(self) -> None:
        assert subnetwork_steps(build_model("mlp", (8,), 3, 0.5, widths=(16, 16)), 4) == []


def test_diversity_off_diagonal_is_positive_and_eval_size_is_reported() -> None:
    model = _gyro_mlp(8, 2, total=64)
    x = torch.randn(20, 8)
    data = Dataset(
        "t",
        x,
        torch.zeros(20, dtype=torch.long),
        x,
        torch.zeros(20, dtype=torch.long),
        3,
        ("a", "b", "c"),
    )
    out = diversity(model, data, count=8, eval_size=10)
    m = out["diversity_matrix"]
    assert all(m[i][j] > 0 for i in range(8) for j in range(8) if i != j)
    assert out["diversity_eval_size"] == 10
    with pytest.raises(ValueError, match="eval_size"):
        diversity(model, data, count=2, eval_size=0)
