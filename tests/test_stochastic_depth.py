"""StochasticDepth and its functional form: rates, scaling, seeding, steps, DDP rows."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from torch import nn

import gyrodrop
from gyrodrop import distributed
from gyrodrop.stochastic_depth import StochasticDepthBlock, block_keep, stochastic_depth
from statcheck import ALPHA, assert_poisson_binomial, assert_rate


def scaled(p):
    """``1/(1-p)`` as float32 arithmetic gives it."""
    return torch.tensor(1.0 / (1.0 - p)).item()


def fake_rank(monkeypatch, rank, world):
    """Make row_window report this process as ``rank`` of ``world`` equal batches."""
    monkeypatch.setattr(distributed, "row_window", lambda b: (rank * b, world * b))


class TestStochasticDepthFunction:
    def test_eval_returns_the_input_itself(self):
        x = torch.randn(4, 3)
        for mode in ("block", "sample"):
            assert stochastic_depth(x, 0.5, mode, training=False) is x

    def test_p_zero_is_the_identity(self):
        x = torch.randn(4, 3)
        assert stochastic_depth(x, 0.0, "sample", seed=3, step=7) is x

    @pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
    def test_block_mode_drops_the_whole_batch_at_rate_p(self, p):
        x = torch.ones(5, 2)
        dropped = 0
        n = 2000
        for step in range(n):
            y = stochastic_depth(x, p, "block", seed=11, step=step)
            values = set(y.unique().tolist())
            assert values in ({0.0}, {scaled(p)})
            dropped += int(y.sum() == 0)
        assert binomtest(dropped, n, p).pvalue > ALPHA

    @pytest.mark.parametrize("p", [0.2, 0.7])
    def test_block_mode_rate_holds_across_seeds_at_a_fixed_step(self, p):
        n = 2000
        dropped = sum(not block_keep(seed, 5, p) for seed in range(n))
        assert binomtest(dropped, n, p).pvalue > ALPHA

    @pytest.mark.parametrize("p", [0.25, 0.5])
    def test_sample_mode_drops_rows_independently_at_rate_p(self, p):
        x = torch.ones(500, 3, 2)
        y = stochastic_depth(x, p, "sample", seed=2, step=9)
        per_row = y.reshape(500, -1)
        assert bool((per_row == per_row[:, :1]).all())  # a row is dropped or kept whole
        kept = per_row[:, 0] != 0
        assert torch.allclose(per_row[kept], torch.full_like(per_row[kept], 1 / (1 - p)))
        assert binomtest(int((~kept).sum()), 500, p).pvalue > ALPHA
        # consecutive rows are not correlated: count changes between neighbours
        changes = int((kept[1:] != kept[:-1]).sum())
        assert binomtest(changes, 499, 2 * p * (1 - p)).pvalue > ALPHA

    def test_kept_branches_are_scaled_so_the_mean_is_unbiased(self):
        x = torch.ones(4000, 1)
        y = stochastic_depth(x, 0.5, "sample", seed=0, step=0)
        assert abs(float(y.mean()) - 1.0) < 0.1  # 2 * Binomial(4000, .5) / 4000: sd 0.016

    def test_same_seed_and_step_give_the_same_decisions(self):
        x = torch.randn(64, 4)
        a = stochastic_depth(x, 0.5, "sample", seed=4, step=3)
        assert torch.equal(a, stochastic_depth(x, 0.5, "sample", seed=4, step=3))
        assert not torch.equal(a, stochastic_depth(x, 0.5, "sample", seed=4, step=4))
        assert not torch.equal(a, stochastic_depth(x, 0.5, "sample", seed=5, step=3))

    @given(seed=st.integers(0, 2**63 - 1), step=st.integers(0, 10**9), rank=st.integers(0, 7))
    @settings(max_examples=50, deadline=None)
    def test_block_decision_is_a_function_of_seed_and_step_only(self, seed, step, rank):
        x = torch.ones(3, 2)
        single = stochastic_depth(x, 0.5, "block", seed=seed, step=step)
        with pytest.MonkeyPatch.context() as mp:
            fake_rank(mp, rank, 8)
            on_rank = stochastic_depth(x, 0.5, "block", seed=seed, step=step)
        assert torch.equal(single, on_rank)

    def test_sample_mode_under_ddp_matches_one_process_with_the_global_batch(self, monkeypatch):
        world, local = 4, 6
        x = torch.ones(world * local, 2)
        whole = stochastic_depth(x, 0.5, "sample", seed=8, step=2)
        for rank in range(world):
            fake_rank(monkeypatch, rank, world)
            part = stochastic_depth(x[:local], 0.5, "sample", seed=8, step=2)
            assert torch.equal(part, whole[rank * local : (rank + 1) * local])

    def test_gradient_flows_through_kept_rows_only(self):
        x = torch.ones(200, 3, requires_grad=True)
        y = stochastic_depth(x, 0.5, "sample", seed=1, step=0)
        y.sum().backward()
        assert torch.equal(x.grad, y.detach())  # d(x * f)/dx = f

    def test_dtype_and_shape_are_kept(self):
        x = torch.ones(8, 2, 3, dtype=torch.float64)
        y = stochastic_depth(x, 0.3, "sample", seed=0, step=0)
        assert y.dtype == torch.float64 and y.shape == x.shape

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"p": 1.0}, r"p must be in \[0, 1\), got 1.0"),
            ({"p": -0.1}, r"p must be in \[0, 1\)"),
            ({"p": "0.5"}, r"p must be a float"),
            ({"mode": "row"}, r"mode must be one of \('block', 'sample'\), got 'row'"),
        ],
    )
    def test_invalid_arguments_are_rejected(self, kwargs, message):
        args = {"p": 0.5, "mode": "block"} | kwargs
        with pytest.raises(ValueError, match=message):
            stochastic_depth(torch.ones(2, 2), args["p"], args["mode"])


class TestStochasticDepthModule:
    def test_eval_is_the_identity_and_does_not_step(self):
        sd = gyrodrop.StochasticDepth(0.5).eval()
        x = torch.randn(4, 3)
        assert sd(x) is x
        assert int(sd.step) == 0

    def test_each_training_forward_advances_one_step_and_matches_the_function(self):
        sd = gyrodrop.StochasticDepth(0.5, "sample", seed=9)
        x = torch.ones(16, 2)
        for step in range(5):
            expected = stochastic_depth(x, 0.5, "sample", seed=9, step=step)
            assert torch.equal(sd(x), expected)
        assert int(sd.step) == 5

    def test_auto_step_false_waits_for_gyrodrop_step(self):
        sd = gyrodrop.StochasticDepth(0.5, "sample", auto_step=False)
        x = torch.ones(32, 1)
        first = sd(x)
        assert torch.equal(sd(x), first) and int(sd.step) == 0
        gyrodrop.step(sd)
        assert int(sd.step) == 1
        assert torch.equal(sd(x), stochastic_depth(x, 0.5, "sample", seed=0, step=1))

    def test_state_dict_resumes_the_exact_sequence(self):
        a = gyrodrop.StochasticDepth(0.5, "sample", seed=3)
        x = torch.ones(32, 1)
        for _ in range(4):
            a(x)
        b = gyrodrop.StochasticDepth(0.5, "sample", seed=0)
        b.load_state_dict(a.state_dict())
        assert all(torch.equal(a(x), b(x)) for _ in range(3))

    def test_writes_to_the_step_buffer_are_seen(self):
        sd = gyrodrop.StochasticDepth(0.5, "sample")
        x = torch.ones(32, 1)
        sd(x)
        with torch.no_grad():
            sd.step.fill_(40)
        assert torch.equal(sd(x), stochastic_depth(x, 0.5, "sample", seed=0, step=40))
        sd.step = torch.tensor(7)  # a new tensor, not an in-place write
        assert torch.equal(sd(x), stochastic_depth(x, 0.5, "sample", seed=0, step=7))

    def test_copies_read_the_step_they_were_copied_with(self):
        sd = gyrodrop.StochasticDepth(0.5, "sample")
        x = torch.ones(32, 1)
        sd.current_step()  # a cached read at step 0
        with torch.no_grad():
            sd.step.fill_(9)
        for copy_ in (copy.deepcopy(sd), pickle.loads(pickle.dumps(sd))):
            assert torch.equal(copy_(x), stochastic_depth(x, 0.5, "sample", seed=0, step=9))

    def test_warmup_ramps_linearly_and_reaches_the_full_rate(self):
        sd = gyrodrop.StochasticDepth(0.4, warmup_steps=10)
        assert sd.rate(0) == 0.0
        assert sd.rate(5) == pytest.approx(0.2)
        assert sd.rate(10) == pytest.approx(0.4)
        assert sd.rate(1000) == pytest.approx(0.4)
        assert sd.rate() == 0.0  # the current step

    def test_warmup_scales_kept_branches_by_the_current_rate(self):
        sd = gyrodrop.StochasticDepth(0.5, "sample", warmup_steps=4)
        x = torch.ones(64, 1)
        assert torch.equal(sd(x), x)  # step 0: rate 0
        sd(x)  # step 1
        y = sd(x)  # step 2: rate 0.25
        assert set(y.unique().tolist()) == {0.0, scaled(0.25)}

    def test_draw_scale_is_zero_or_the_inverse_keep_rate(self):
        sd = gyrodrop.StochasticDepth(0.5, seed=2)
        scales = [sd.draw_scale() for _ in range(200)]
        assert set(scales) == {0.0, 2.0}
        assert int(sd.step) == 200
        assert scales == [2.0 if block_keep(2, s, 0.5) else 0.0 for s in range(200)]

    def test_draw_scale_is_refused_in_sample_mode(self):
        with pytest.raises(ValueError, match="draw_scale\\(\\) is for mode='block'"):
            gyrodrop.StochasticDepth(0.5, "sample").draw_scale()

    def test_extra_repr_lists_the_hyperparameters(self):
        text = repr(gyrodrop.StochasticDepth(0.2, "sample", warmup_steps=5))
        assert "p=0.2" in text and "mode=sample" in text and "warmup_steps=5" in text

    @pytest.mark.parametrize(
        "args, kwargs, message",
        [
            ((1.5,), {}, r"StochasticDepth: p must be in \[0, 1\), got 1.5"),
            ((0.5, "rows"), {}, r"StochasticDepth: mode must be one of"),
            ((0.5,), {"seed": -1}, r"StochasticDepth: seed must be in"),
            ((0.5,), {"warmup_steps": -2}, r"StochasticDepth: warmup_steps must be >= 0"),
            ((0.5,), {"auto_step": 1}, r"StochasticDepth: auto_step must be a bool"),
        ],
    )
    def test_invalid_arguments_fail_at_construction(self, args, kwargs, message):
        with pytest.raises(ValueError, match=message):
            gyrodrop.StochasticDepth(*args, **kwargs)


# --------------------------------------------------------------------------------------
# Rates and scales with power (issue 17): every p, not only 0.5; samples large enough that
# a rate 10% off fails by many standard deviations; bounds at statcheck.ALPHA.


class OnesBranch(nn.Module):
    """A ResidualBlock whose branch is ones and shortcut zeros: the wrapper's output is
    the branch factor itself."""

    def branch(self, x):
        return torch.ones_like(x)

    def shortcut(self, x):
        return torch.zeros_like(x)

    def forward(self, x):
        return self.shortcut(x) + self.branch(x)


RATES = [0.1, 0.3, 0.5, 0.8]


class TestRatesWithPower:
    @pytest.mark.parametrize("p", [0.1, 0.3, 0.75, 0.9])
    def test_block_mode_kept_branch_is_scaled_by_one_over_keep_rate_on_every_path(self, p):
        # Catches 1/p instead of 1/(1-p) (equal at p = 0.5 only) in any one of the four
        # block-mode paths: functional, module forward, draw_scale, the block wrapper.
        want = 1.0 / (1.0 - p)
        sd = gyrodrop.StochasticDepth(p, "block", seed=3)
        drawer = gyrodrop.StochasticDepth(p, "block", seed=3)
        wrapper = StochasticDepthBlock(OnesBranch(), p, "block", seed=3)
        seen = {"functional": set(), "forward": set(), "draw_scale": set(), "wrapper": set()}
        for step in range(300):
            y = stochastic_depth(torch.ones(2, 1), p, "block", seed=3, step=step)
            seen["functional"] |= set(y.flatten().tolist())
            seen["forward"] |= set(sd(torch.ones(2, 1)).flatten().tolist())
            seen["draw_scale"].add(drawer.draw_scale())
            seen["wrapper"] |= set(wrapper(torch.ones(2, 1)).flatten().tolist())
        for path, values in seen.items():
            assert sorted(values) == [0.0, pytest.approx(want, rel=1e-6)], path

    @pytest.mark.parametrize("p", [0.2, 0.7])
    def test_block_decisions_of_every_path_are_the_pure_function_of_seed_and_step(self, p):
        # The rate test below runs on block_keep; this ties every path to it (catches a
        # path that thresholds at another rate or keys on another step).
        sd = gyrodrop.StochasticDepth(p, "block", seed=5)
        drawer = gyrodrop.StochasticDepth(p, "block", seed=5)
        want = [block_keep(5, s, p) for s in range(2000)]
        assert [bool(sd(torch.ones(1)) != 0) for _ in range(2000)] == want
        assert [drawer.draw_scale() != 0.0 for _ in range(2000)] == want

    @pytest.mark.parametrize("p", RATES)
    def test_block_mode_drop_rate_is_p_over_fifty_thousand_steps(self, p):
        # n = 5e4: a rate of 0.45 instead of 0.5 is 22 sd off, 0.09 instead of 0.1 4.7 sd,
        # 0.27 instead of 0.3 14 sd (the bound is 4.9 sd).
        n = 50_000
        dropped = sum(not block_keep(11, s, p) for s in range(n))
        assert_rate(dropped, n, p, f"block-mode drop rate at p={p}")

    @pytest.mark.parametrize("p", RATES)
    def test_sample_mode_drop_rate_is_p_over_a_hundred_thousand_rows(self, p):
        # n = 1e5 rows, two steps: 0.45 vs 0.5 is 32 sd; also every dropped row is 0 and
        # every kept row exactly 1/(1-p).
        sd = gyrodrop.StochasticDepth(p, "sample", seed=2)
        for _ in range(2):
            y = sd(torch.ones(100_000, 1))[:, 0]
            kept = y != 0
            assert torch.allclose(y[kept], torch.full_like(y[kept], 1.0 / (1.0 - p)))
            assert_rate(int((~kept).sum()), y.numel(), p, f"sample-mode drop rate at p={p}")

    @pytest.mark.parametrize("p, warmup", [(0.6, 3000), (0.3, 2000)])
    def test_block_mode_warmup_decides_and_scales_at_the_ramped_rate(self, p, warmup):
        # During the ramp, step s drops at rate r_s = p * s / warmup and scales a kept
        # branch by 1/(1-r_s). Catches deciding at p (twice the expected drops over the
        # ramp), scaling by 1/(1-p), or a ramp that ends at another step.
        sd = gyrodrop.StochasticDepth(p, "block", seed=7, warmup_steps=warmup)
        fwd = gyrodrop.StochasticDepth(p, "block", seed=7, warmup_steps=warmup)
        steps = warmup + 1000
        rates = [p * min(s, warmup) / warmup for s in range(steps)]
        scales = [sd.draw_scale() for _ in range(steps)]
        assert [float(fwd(torch.ones(1))) for _ in range(steps)] == pytest.approx(scales)
        for s, (r, scale) in enumerate(zip(rates, scales, strict=True)):
            assert scale in (0.0, pytest.approx(1.0 / (1.0 - r))), f"step {s}, rate {r}"
        ramp = [scale == 0.0 for scale in scales[:warmup]]
        assert_poisson_binomial(sum(ramp), rates[:warmup], "drops during the warm-up")
        after = [scale == 0.0 for scale in scales[warmup:]]
        assert_rate(sum(after), len(after), p, "drops after the warm-up")

    @pytest.mark.parametrize("p, warmup, at", [(0.5, 4, 2), (0.8, 10, 3)])
    def test_sample_mode_warmup_drops_rows_at_the_ramped_rate(self, p, warmup, at):
        # At step `at` rows drop at p * at / warmup (1e5 rows); catches a ramp on the
        # scale only, or the decision taken at the full p.
        rate = p * at / warmup
        sd = gyrodrop.StochasticDepth(p, "sample", seed=1, warmup_steps=warmup)
        gyrodrop.step(sd, at)
        y = sd(torch.ones(100_000, 1))[:, 0]
        kept = y != 0
        assert torch.allclose(y[kept], torch.full_like(y[kept], 1.0 / (1.0 - rate)))
        assert_rate(int((~kept).sum()), y.numel(), rate, "sample-mode drops during the ramp")

    def test_state_dict_with_another_seed_changes_the_decisions_after_a_forward(self):
        # The host copy of the seed must be refreshed by load_state_dict.
        a = gyrodrop.StochasticDepth(0.5, "sample", seed=1)
        a(torch.ones(64, 1))
        b = gyrodrop.StochasticDepth(0.5, "sample", seed=2)
        gyrodrop.step(b)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(torch.ones(64, 1)), b(torch.ones(64, 1)))
