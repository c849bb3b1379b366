"""The GyroDropout contract (DESIGN.md) on shapes, batches, dtypes, resume and compile."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop.distributed import group_sizes
from gyrodrop.gyro import gyro_dropout
from statcheck import assert_independent_rates, assert_rate


def make(p=0.5, sigma=16, tau=4, **kw):
    kw.setdefault("steps_per_set", 3)
    return gyrodrop.GyroDropout(p, sigma, tau, **kw)


def row_groups(batch, tau):
    """Row index ranges of the tau groups."""
    out, lo = [], 0
    for size in group_sizes(batch, tau):
        out.append(range(lo, lo + size))
        lo += size
    return out


shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3)


class TestGroupStructure:
    @given(
        batch=st.integers(1, 40),
        rest=shapes,
        sigma_tau=st.integers(1, 16).flatmap(lambda s: st.tuples(st.just(s), st.integers(1, s))),
        p=st.sampled_from([0.1, 0.5, 0.9]),
        steps=st.integers(0, 5),
    )
    @settings(max_examples=80, deadline=None)
    def test_rows_of_a_group_share_one_scaled_mask(self, batch, rest, sigma_tau, p, steps):
        sigma, tau = sigma_tau
        drop = make(p, sigma, tau, steps_per_set=2)
        gyrodrop.step(drop, steps)
        x = torch.ones(batch, *rest)
        y = drop(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        values = set(y.unique().tolist())
        assert values <= {0.0, torch.tensor(1.0 / (1.0 - p)).item()}
        groups = row_groups(batch, tau)
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == batch
        for g in groups:
            for r in g:
                assert torch.equal(y[r], y[g[0]])

    def test_groups_use_the_masks_of_the_active_set_in_order(self):
        drop = make(0.5, 16, 4, steps_per_set=2)
        x = torch.ones(9, 32)
        masks = drop.active_masks(x)  # (tau, 32)
        y = drop(x)
        for g, rows in enumerate(row_groups(9, 4)):
            for r in rows:
                assert torch.equal(y[r], masks[g])

    def test_batch_smaller_than_tau_uses_the_first_masks(self):
        drop = make(0.5, 16, 8)
        x = torch.ones(3, 64)
        masks = drop.active_masks(x)
        assert torch.equal(drop(x), masks[:3])

    def test_one_row_batch_works(self):
        drop = make(0.5, 16, 8)
        x = torch.ones(1, 64)
        assert torch.equal(drop(x), drop.active_masks(x, step=0)[:1])

    def test_empty_batch_keeps_shape_and_grad(self):
        x = torch.ones(0, 5, requires_grad=True)
        y = make()(x)
        assert y.shape == (0, 5)
        y.sum().backward()

    def test_distinct_groups_get_distinct_masks(self):
        y = make(0.5, 64, 4)(torch.ones(8, 256))
        assert not torch.equal(y[0], y[2])


class TestDropRateAndScaling:
    @pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8])
    def test_drop_rate_over_many_subnetworks_is_p(self, p):
        drop = make(p, 512, 16, steps_per_set=1)
        drops = n = 0
        for _ in range(32):  # 32 sets of 16 masks over 1000 features
            y = drop(torch.ones(16, 1000))
            drops += int((y == 0).sum())
            n += y.numel()
        assert_rate(drops, n, p, "drop rate over 512 subnetworks")

    def test_inverted_scaling_preserves_the_expectation(self):
        drop = make(0.5, 1024, 16, steps_per_set=1)
        x = torch.randn(16, 512)
        mean = torch.stack([drop(x) for _ in range(64)]).mean(0)
        assert (mean - x).abs().mean() < 0.15

    def test_realized_scale_preserves_each_mask_sum_exactly(self):
        drop = make(0.3, 16, 4, scale="realized")
        y = drop(torch.ones(4, 7, 11))
        assert torch.allclose(y.sum(dim=(1, 2)), torch.full((4,), 77.0))

    def test_gradient_is_the_mask(self):
        drop = make(0.5, 16, 4)
        x = torch.randn(8, 10, requires_grad=True)
        masks = drop.active_masks(x)
        drop(x).sum().backward()
        assert torch.equal(x.grad, masks.repeat_interleave(2, dim=0))


class TestDims:
    def test_sequence_mask_is_shared_over_time(self):
        drop = make(dims=(-1,))
        y = drop(torch.ones(8, 5, 32))
        assert torch.equal(y, y[:, :1].expand_as(y))
        assert drop.active_masks(torch.ones(8, 5, 32)).shape == (4, 1, 32)

    def test_channelwise_mask_on_feature_maps(self):
        drop = make(dims=(1,))
        y = drop(torch.ones(8, 16, 3, 3))
        assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
        assert not torch.equal(y[:, 0], y[:, 1]) or not torch.equal(y[:, 2], y[:, 3])

    def test_default_spans_every_non_batch_dim(self):
        y = make()(torch.ones(8, 4, 6, 6))
        assert not torch.equal(y[:, :, :1, :1].expand_as(y), y)

    def test_out_of_range_dims_name_the_shape_and_hint(self):
        with pytest.raises(
            ValueError, match=r"dims=\(3,\) is out of range.*\(4, 5\).*dims=\(-1,\)"
        ):
            make(dims=(3,))(torch.ones(4, 5))

    def test_one_dimensional_input_masks_whole_rows(self):
        y = make(0.5, 64, 4)(torch.ones(16))
        assert set(y.tolist()) <= {0.0, 2.0}


class TestModes:
    def test_eval_is_identity(self):
        drop = make().eval()
        x = torch.randn(6, 4)
        assert drop(x) is x
        assert int(drop.step) == 0

    def test_p_zero_is_identity_in_training(self):
        x = torch.randn(6, 4)
        assert torch.equal(make(0.0)(x), x)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    def test_keeps_dtype(self, dtype):
        x = torch.ones(8, 12, dtype=dtype)
        y = make()(x)
        assert y.dtype == dtype and set(y.float().unique().tolist()) <= {0.0, 2.0}

    def test_same_seed_same_masks_other_seed_other_masks(self):
        x = torch.ones(8, 256)
        assert torch.equal(make(seed=7)(x), make(seed=7)(x))
        assert not torch.equal(make(seed=7)(x), make(seed=8)(x))

    def test_module_matches_functional_form_at_every_step(self):
        drop = make(0.4, 12, 3, steps_per_set=2)
        x = torch.randn(7, 5)
        for step in range(8):
            expected = gyro_dropout(
                x, 0.4, step=step, seed=0, num_subnets=12, subnets_per_step=3, steps_per_set=2
            )
            assert torch.equal(drop(x), expected)

    def test_schedule_seed_decouples_masks_from_schedule(self):
        a = make(0.5, 64, 4, seed=1, schedule_seed=9)
        b = make(0.5, 64, 4, seed=2, schedule_seed=9)
        assert torch.equal(a.active_subnets(), b.active_subnets())
        x = torch.ones(4, 256)
        assert not torch.equal(a(x), b(x))

    def test_writes_to_the_step_buffer_are_seen(self):
        drop = make(0.5, 64, 4, steps_per_set=1)
        x = torch.ones(4, 256)
        first = drop(x)
        drop.step.zero_()
        assert torch.equal(drop(x), first)
        drop.load_state_dict({**drop.state_dict(), "step": torch.tensor(0)})
        assert int(drop.step) == 0 and torch.equal(drop(x), first)

    def test_random_schedule_changes_masks_every_step(self):
        drop = make(0.5, 256, 4, steps_per_set=100, schedule="random")
        x = torch.ones(4, 128)
        assert not torch.equal(drop(x), drop(x))

    def test_consecutive_schedule_holds_masks_for_steps_per_set(self):
        drop = make(0.5, 256, 4, steps_per_set=3)
        x = torch.ones(4, 128)
        ys = [drop(x) for _ in range(4)]
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[1], ys[2])
        assert not torch.equal(ys[2], ys[3])

    def test_only_tau_masks_are_held_for_large_sigma(self):
        drop = make(0.5, 4096, 16, steps_per_set=10)
        x = torch.ones(256, 1024)
        drop(x)
        assert drop.active_masks(x).shape == (16, 1024)
        state = drop.state_dict()
        assert sorted(state) == ["_extra_state", "schedule_seed", "seed", "step"]
        assert all(t.numel() == 1 for name, t in state.items() if name != "_extra_state")
        assert state["_extra_state"].numel() < 256  # the hyperparameters, no masks

    def test_extra_repr_lists_hyperparameters(self):
        text = repr(make(0.25, 32, 8, schedule="random"))
        for part in ("p=0.25", "num_subnets=32", "subnets_per_step=8", "schedule=random"):
            assert part in text


class TestAutocast:
    def test_bfloat16_autocast_linear_then_gyro(self):
        model = nn.Sequential(nn.Linear(8, 16), make())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(4, 8))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert model[0].weight.grad is not None


def _train(model, opt, steps, start):
    gen = torch.Generator().manual_seed(1234 + start)
    for _ in range(steps):
        x = torch.randn(10, 6, generator=gen)
        y = torch.randint(0, 3, (10,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 32),
            nn.ReLU(),
            gyrodrop.GyroDropout(0.5, 16, 4, steps_per_set=3, seed=1),
            nn.Linear(32, 32),
            nn.ReLU(),
            gyrodrop.GyroDropout(0.3, 32, 2, steps_per_set=2, seed=2, schedule="random"),
            nn.Linear(32, 3),
        )


class TestResume:
    def test_resume_from_state_dict_is_bitwise_identical(self):
        n = 7
        straight = _model()
        opt = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
        _train(straight, opt, n, 0)
        _train(straight, opt, n, 1)

        first = _model()
        opt1 = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
        _train(first, opt1, n, 0)
        checkpoint = {"model": first.state_dict(), "opt": opt1.state_dict()}

        resumed = _model()
        for module in resumed.modules():  # a fresh model starts at step 0
            if isinstance(module, gyrodrop.GyroDropout):
                assert int(module.step) == 0
        opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
        resumed.load_state_dict(checkpoint["model"])
        opt2.load_state_dict(checkpoint["opt"])
        _train(resumed, opt2, n, 1)
        for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b)


class TestCompile:
    def test_compiled_matches_eager_at_the_same_step(self):
        torch._dynamo.reset()
        eager = make(0.5, 16, 4, steps_per_set=2)
        compiled_module = make(0.5, 16, 4, steps_per_set=2)
        compiled = torch.compile(compiled_module, backend="aot_eager")
        x = torch.randn(10, 12)
        for _ in range(5):
            assert torch.equal(compiled(x), eager(x))
        assert int(compiled_module.step) == 5

    def test_inductor_compiled_model_matches_eager(self):
        torch._dynamo.reset()
        eager = _model()
        compiled = torch.compile(_model())
        x = torch.randn(8, 6)
        for _ in range(3):
            assert torch.allclose(compiled(x), eager(x), atol=1e-6)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"p": 1.0}, r"p must be in \[0, 1\), got 1.0"),
            ({"p": -0.1}, r"p must be in \[0, 1\), got -0.1"),
            ({"p": "a"}, r"p must be a float in \[0, 1\)"),
            ({"num_subnets": 0}, r"num_subnets must be >= 1, got 0"),
            (
                {"num_subnets": 4, "subnets_per_step": 5},
                r"subnets_per_step must be in \[1, 4\], got 5",
            ),
            ({"subnets_per_step": 0}, r"subnets_per_step must be in \[1, 256\], got 0"),
            (
                {"total_steps": 10, "steps_per_set": 2},
                "at most one of total_steps and steps_per_set",
            ),
            ({"steps_per_set": 0}, r"steps_per_set must be >= 1, got 0"),
            (
                {"schedule": "roundrobin"},
                r"schedule must be one of \('consecutive', 'random', 'replacement'\)",
            ),
            ({"scale": "none"}, r"scale must be one of \('inverted', 'realized'\)"),
            ({"dims": (0,)}, "dim 0 is the batch"),
            ({"dims": (1, 1)}, "must not repeat"),
            ({"seed": -1}, r"seed must be in \[0, 9223372036854775807\], got -1"),
        ],
    )
    def test_bad_arguments_raise_value_error_naming_them(self, kwargs, message):
        kwargs = {"steps_per_set": 1, **kwargs} if "total_steps" not in kwargs else kwargs
        with pytest.raises(ValueError, match=message):
            gyrodrop.GyroDropout(**kwargs)

    def test_zero_dim_input_is_rejected(self):
        with pytest.raises(ValueError, match="0-d tensor"):
            make()(torch.tensor(1.0))

    def test_missing_total_steps_warns(self):
        with pytest.warns(UserWarning, match="total_steps"):
            gyrodrop.GyroDropout(0.5)

    def test_total_steps_given_does_not_warn(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gyrodrop.GyroDropout(0.5, 256, 16, total_steps=1000)


# --------------------------------------------------------------------------------------
# Subnetworks with power (issue 17).


class TestSubnetworkStatistics:
    def test_a_cycle_of_sets_trains_sigma_distinct_masks(self):
        # sigma = 256 masks over 64 features (a collision has probability 2**-49 at
        # p = 0.5): one cycle of sets trains 256 distinct masks and subnet_mask(k) gives
        # 256 distinct masks. Catches ids or mask keys that collapse (k // 2: half).
        drop = make(0.5, 256, 16, steps_per_set=1, seed=5)
        groups = torch.cat([drop(torch.ones(16, 64)) for _ in range(16)])  # 16 sets x 16
        assert torch.unique(groups, dim=0).shape[0] == 256
        like = torch.ones(1, 64)
        masks = torch.stack([drop.subnet_mask(k, like) for k in range(256)])
        assert torch.unique(masks, dim=0).shape[0] == 256

    @pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
    def test_every_feature_is_dropped_at_rate_p(self, p):
        # 8192 subnetworks x 48 features through the module (tau = sigma: one forward
        # shows every mask); chi-square on the 48 per-feature drop counts and the exact
        # binomial on the total (393216 draws: 0.45 instead of 0.5 is 63 sd off).
        # Catches a rate off p and features that drop more often than others.
        drop = make(p, 8192, 8192, steps_per_set=1, seed=7)
        y = drop(torch.ones(8192, 48))
        dropped = (y == 0).sum(0)
        assert_rate(int(dropped.sum()), y.numel(), p, "element drop rate")
        assert_independent_rates(dropped.tolist(), 8192, p, "per-feature drops")
        kept = y[y != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)))

    @pytest.mark.parametrize("field", ["seed", "schedule_seed"])
    def test_state_dict_with_another_seed_rebuilds_the_cached_masks(self, field):
        # The active-mask cache must be keyed on both seeds: a checkpoint with another
        # seed, loaded after a forward at the same step, must not reuse stale masks.
        a = make(0.5, 16, 4, steps_per_set=5, seed=1)
        b = make(0.5, 16, 4, steps_per_set=5, seed=1)
        with torch.no_grad():
            getattr(b, field).fill_(2)
        a(torch.ones(8, 32))
        state = b.state_dict()
        a.load_state_dict(state)
        assert torch.equal(a(torch.ones(8, 32)), b(torch.ones(8, 32)))
