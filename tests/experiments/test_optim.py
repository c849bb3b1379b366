"""Tests for gyrodrop.experiments.optim: TF1-style RMSProp against hand-computed steps,
and the step learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyrodrop.experiments.optim import TF1RMSprop, step_lr_factor, step_milestones


def _param(value: list[float]) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))


class TestTF1RMSprop:
    def test_two_steps_match_hand_computed_values(self) -> None:
        # lr 0.1, decay 0.9, momentum 0.9, eps 1, ms starts at 1 (TensorFlow 1)
        w = _param([1.0, -2.0])
        opt = TF1RMSprop([w], lr=0.1)
        w.grad = torch.tensor([2.0, 0.5], dtype=torch.float64)
        opt.step()
        ms1 = [0.9 + 0.1 * 4.0, 0.9 + 0.1 * 0.25]
        mom1 = [0.1 * 2.0 / math.sqrt(ms1[0] + 1), 0.1 * 0.5 / math.sqrt(ms1[1] + 1)]
        assert w.tolist() == pytest.approx([1.0 - mom1[0], -2.0 - mom1[1]], abs=1e-12)
        w.grad = torch.tensor([-1.0, 3.0], dtype=torch.float64)
        opt.step()
        ms2 = [0.9 * ms1[0] + 0.1 * 1.0, 0.9 * ms1[1] + 0.1 * 9.0]
        mom2 = [
            0.9 * mom1[0] + 0.1 * -1.0 / math.sqrt(ms2[0] + 1),
            0.9 * mom1[1] + 0.1 * 3.0 / math.sqrt(ms2[1] + 1),
        ]
        expect = [1.0 - mom1[0] - mom2[0], -2.0 - mom1[1] - mom2[1]]
        assert w.tolist() == pytest.approx(expect, abs=1e-12)

    @pytest.mark.parametrize(
        ("decay", "momentum"), [(0.9, 0.5), (0.5, 0.9), (0.99, 0.0), (0.0, 0.7), (0.3, 0.95)]
    )
    def test_decay_and_momentum_each_do_their_own_job(self, decay: float, momentum: float) -> None:
        # momentum != decay: swapping them (the RMS decay used as the momentum, or the
        # other way round) changes every step below
        w = _param([1.0, -2.0, 0.5])
        opt = TF1RMSprop([w], lr=0.1, decay=decay, momentum=momentum, eps=0.5, initial_ms=2.0)
        ms = torch.full((3,), 2.0, dtype=torch.float64)
        mom = torch.zeros(3, dtype=torch.float64)
        expect = w.detach().clone()
        for grad in ([2.0, 0.5, -1.0], [-1.0, 3.0, 0.25], [0.5, -0.5, 4.0]):
            g = torch.tensor(grad, dtype=torch.float64)
            w.grad = g
            opt.step()
            ms = decay * ms + (1 - decay) * g**2
            mom = momentum * mom + 0.1 * g / torch.sqrt(ms + 0.5)
            expect -= mom
            torch.testing.assert_close(w.detach(), expect, atol=1e-12, rtol=0)
        torch.testing.assert_close(opt.state[w]["ms"], ms, atol=1e-12, rtol=0)
        torch.testing.assert_close(opt.state[w]["mom"], mom, atol=1e-12, rtol=0)

    def test_epsilon_is_inside_the_square_root_unlike_torch(self) -> None:
        # zero initial mean square, no momentum: step = lr * g / sqrt(0.1 g^2 + eps)
        w = _param([0.0])
        opt = TF1RMSprop([w], lr=1.0, momentum=0.0, eps=1.0, initial_ms=0.0)
        w.grad = torch.tensor([3.0], dtype=torch.float64)
        opt.step()
        assert w.item() == pytest.approx(-3.0 / math.sqrt(0.9 + 1.0))
        v = _param([0.0])
        ref = torch.optim.RMSprop([v], lr=1.0, alpha=0.9, eps=1.0)
        v.grad = torch.tensor([3.0], dtype=torch.float64)
        ref.step()
        assert v.item() == pytest.approx(-3.0 / (math.sqrt(0.9) + 1.0))  # eps outside
        assert v.item() != pytest.approx(w.item())

    def test_parameters_without_gradient_are_left_alone(self) -> None:
        a, b = _param([1.0]), _param([2.0])
        opt = TF1RMSprop([a, b])
        a.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        assert b.item() == 2.0 and a.item() != 1.0
        assert b not in opt.state

    def test_state_dict_round_trip_continues_identically(self) -> None:
        def run(resume: bool) -> float:
            w = _param([0.5])
            opt = TF1RMSprop([w], lr=0.05)
            for i in range(4):
                if resume and i == 2:
                    state = opt.state_dict()
                    opt = TF1RMSprop([w], lr=0.05)
                    opt.load_state_dict(state)
                w.grad = torch.tensor([float(i + 1)], dtype=torch.float64)
                opt.step()
            return w.item()

        assert run(True) == run(False)

    @pytest.mark.parametrize(
        ("kw", "match"),
        [
            ({"lr": 0.0}, "lr must be > 0"),
            ({"decay": 1.0}, r"decay must be in \[0, 1\)"),
            ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
            ({"eps": -1.0}, "eps must be >= 0"),
            ({"eps": 0.0, "initial_ms": 0.0}, "cannot both be 0"),
        ],
    )
    def test_invalid_arguments_name_the_argument(self, kw: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            TF1RMSprop([_param([0.0])], **kw)

    @given(st.floats(-10, 10), st.floats(1e-3, 1.0))
    @settings(max_examples=40, deadline=None)
    def test_first_step_never_exceeds_lr_times_gradient(self, g: float, lr: float) -> None:
        # sqrt(ms + eps) >= 1 with eps = 1, so |step| <= lr * |g|
        w = _param([0.0])
        opt = TF1RMSprop([w], lr=lr, momentum=0.0)
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        assert abs(w.item()) <= lr * abs(g) + 1e-12


class TestStepSchedule:
    def test_paper_milestones_and_proportional_scaling(self) -> None:
        assert step_milestones(100) == [40, 80]
        assert step_milestones(15) == [6, 12]
        assert step_milestones(1) == [0, 1]

    def test_factor_drops_tenfold_at_each_milestone(self) -> None:
        factors = [step_lr_factor(e, step_milestones(100)) for e in range(100)]
        assert factors[39] == 1.0 and factors[40] == pytest.approx(0.1)
        assert factors[79] == pytest.approx(0.1) and factors[80] == pytest.approx(0.01)

    def test_zero_milestone_never_fires(self) -> None:
        assert step_lr_factor(0, [0, 1]) == 1.0

    def test_epochs_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="epochs must be >= 1"):
            step_milestones(0)
