"""BlockGyroLinear: pruned GEMMs equal the dense reference, masks, state, compile, autocast."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gyrodrop
from gyrodrop import distributed
from gyrodrop.blockwise import BlockGyroLinear, n_dropped_blocks
from gyrodrop.distributed import group_sizes
from statcheck import assert_uniform_inclusion

F64 = torch.float64


def make(in_f=64, out_f=24, *, p=0.5, sigma=16, tau=2, bs=8, prune="input", **kw):
    kw.setdefault("steps_per_set", 3)
    return BlockGyroLinear(
        in_f,
        out_f,
        p=p,
        num_subnets=sigma,
        subnets_per_step=tau,
        block_size=bs,
        prune=prune,
        **kw,
    )


def dense_reference(layer, x, mask, weight, bias):
    """``F.linear(x * mask, W, b)`` (input) or ``F.linear(x, W, b) * mask`` (output), the
    mask ``(B, F)`` broadcast over the middle dims of ``x``."""
    m = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    if layer.prune == "input":
        return F.linear(x * m, weight, bias)
    return F.linear(x, weight, bias) * m


def run_both(layer, x):
    """Output and gradients (x, W, b) of the layer and of the dense reference, same mask,
    same upstream gradient."""
    mask = layer.dense_mask(x.shape[0], dtype=x.dtype)
    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    x2 = x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    y2 = dense_reference(layer, x2, mask, w2, b2)
    dy = torch.randn(y2.shape, dtype=y2.dtype, generator=torch.Generator().manual_seed(7))
    y1.backward(dy)
    y2.backward(dy)
    got = [y1, x1.grad, layer.weight.grad] + ([] if b2 is None else [layer.bias.grad])
    ref = [y2, x2.grad, w2.grad] + ([] if b2 is None else [b2.grad])
    return got, ref


def assert_all_close(got, ref, atol=1e-12):
    assert len(got) == len(ref)
    for name, a, b in zip(["output", "dx", "dW", "db"][: len(got)], got, ref, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"{name} differs")


# shapes: (in, out, batch, middle dims, tau, block size); uneven blocks and batches,
# fewer rows than groups, 3-D and 4-D inputs
SHAPES = [
    (64, 24, 8, (), 2, 8),
    (60, 20, 7, (), 2, 8),  # uneven last block, odd batch
    (30, 21, 3, (), 5, 8),  # B < tau, uneven last block
    (64, 24, 9, (3,), 4, 8),  # 3-D input, uneven groups
    (33, 17, 5, (2, 3), 3, 4),  # 4-D input
    (64, 40, 1, (), 2, 16),  # one row
    (128, 64, 64, (), 2, 32),  # paper-like: 32-wide blocks, 32 rows per group
]


class TestNDroppedBlocks:
    def test_rounds_to_nearest_with_halves_up(self):
        assert [n_dropped_blocks(p, 32) for p in (0.1, 0.25, 0.5, 0.75)] == [3, 8, 16, 24]
        assert n_dropped_blocks(0.5, 3) == 2
        assert n_dropped_blocks(0.0, 7) == 0


class TestMasks:
    @given(
        features=st.integers(1, 200),
        bs=st.integers(1, 40),
        p=st.floats(0.0, 0.95),
        step=st.integers(0, 30),
    )
    @settings(max_examples=60, deadline=None)
    def test_every_mask_drops_exactly_round_p_blocks(self, features, bs, p, step):
        n_blocks = -(-features // bs)
        assume(n_dropped_blocks(p, n_blocks) < n_blocks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = BlockGyroLinear(
                features, 3, p=p, num_subnets=8, subnets_per_step=4, block_size=bs, steps_per_set=2
            )
        keep = layer.block_masks(step)
        assert keep.shape == (4, n_blocks)
        assert (keep.sum(1) == n_blocks - layer.n_dropped).all()
        assert layer.n_dropped == n_dropped_blocks(p, n_blocks)

    def test_group_masks_are_whole_blocks_scaled_by_the_effective_rate(self):
        layer = make(60, 5, p=0.3, bs=8)  # 8 blocks, the last one 4 wide; drops 2
        assert (layer.n_blocks, layer.n_dropped, layer.effective_p) == (8, 2, 0.25)
        masks = layer.group_masks()
        assert masks.shape == (2, 60)
        assert set(masks.unique().tolist()) <= {0.0, torch.tensor(1.0 / 0.75).item()}
        keep = layer.block_masks()
        blocks = masks.reshape(2, -1)[:, :56].reshape(2, 7, 8)
        assert torch.equal(blocks.amin(2) == blocks.amax(2), torch.ones(2, 7, dtype=torch.bool))
        assert torch.equal(blocks[:, :, 0] > 0, keep[:, :7])
        assert torch.equal(masks[:, 56] > 0, keep[:, 7])

    def test_output_pruning_masks_span_output_features(self):
        layer = make(10, 40, prune="output", bs=8)
        assert layer.group_masks().shape == (2, 40) and layer.n_blocks == 5

    @pytest.mark.parametrize("batch", [1, 3, 8, 11])
    def test_dense_mask_gives_each_row_its_groups_mask(self, batch):
        layer = make(tau=3)
        dense, group = layer.dense_mask(batch), layer.group_masks()
        row = 0
        for g, size in enumerate(group_sizes(batch, 3)):
            for _ in range(size):
                assert torch.equal(dense[row], group[g])
                row += 1
        assert row == batch == dense.shape[0]

    def test_subnet_mask_is_the_mask_its_group_uses(self):
        layer = make(tau=4, sigma=16)
        active = layer.active_subnets().tolist()
        group = layer.group_masks()
        like = torch.zeros(3, 64, dtype=F64)
        for g, k in enumerate(active):
            mask = layer.subnet_mask(k, like)
            assert mask.dtype == F64 and torch.equal(mask.float(), group[g])
        with pytest.raises(ValueError, match=r"k must be in \[0, 15\], got 16"):
            layer.subnet_mask(16)

    def test_masks_hold_for_a_set_and_change_with_the_next(self):
        layer = make(steps_per_set=3, sigma=64)
        first = [layer.group_masks(s) for s in range(3)]
        assert all(torch.equal(first[0], m) for m in first)
        assert not torch.equal(first[0], layer.group_masks(3))

    def test_distinct_seeds_give_distinct_masks(self):
        assert not torch.equal(make(seed=1).group_masks(), make(seed=2).group_masks())


class TestExactness:
    @pytest.mark.parametrize("prune", ["input", "output"])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize(("in_f", "out_f", "batch", "mid", "tau", "bs"), SHAPES)
    def test_output_and_all_gradients_equal_the_dense_reference(
        self, in_f, out_f, batch, mid, tau, bs, prune, bias
    ):
        torch.manual_seed(0)
        layer = make(in_f, out_f, tau=tau, bs=bs, prune=prune, bias=bias, dtype=F64)
        x = torch.randn(batch, *mid, in_f, dtype=F64)
        got, ref = run_both(layer, x)
        assert_all_close(got, ref)

    @given(
        in_f=st.integers(1, 50),
        out_f=st.integers(1, 50),
        batch=st.integers(1, 13),
        tau=st.integers(1, 5),
        bs=st.integers(1, 9),
        p=st.sampled_from([0.25, 0.5, 0.75]),
        prune=st.sampled_from(["input", "output"]),
        step=st.integers(0, 20),
    )
    @settings(max_examples=60, deadline=None)
    def test_random_shapes_equal_the_dense_reference(
        self, in_f, out_f, batch, tau, bs, p, prune, step
    ):
        features = in_f if prune == "input" else out_f
        n_blocks = -(-features // bs)
        assume(0 < n_dropped_blocks(p, n_blocks) < n_blocks)
        layer = make(in_f, out_f, p=p, sigma=8, tau=tau, bs=bs, prune=prune, dtype=F64)
        gyrodrop.step(layer, step)
        x = torch.randn(batch, in_f, dtype=F64, generator=torch.Generator().manual_seed(step))
        got, ref = run_both(layer, x)
        assert_all_close(got, ref)

    def test_float32_matches_the_dense_reference(self):
        layer = make(96, 40, bs=32)
        got, ref = run_both(layer, torch.randn(16, 96))
        assert_all_close(got, ref, atol=1e-5)

    def test_distributed_rows_take_the_masks_of_their_global_rows(self, monkeypatch):
        # rank 1 of 2 with 5 local rows: global rows 5..9 of 10, groups [4, 3, 3]
        layer = make(tau=3, dtype=F64)
        full = layer.dense_mask(10)
        monkeypatch.setattr(distributed, "row_window", lambda b: (5, 10))
        assert torch.equal(layer.dense_mask(5), full[5:])
        got, ref = run_both(layer, torch.randn(5, 64, dtype=F64))
        assert_all_close(got, ref)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_a_second_forward_before_backward_leaves_both_gradients_exact(self, prune):
        # the layer reuses scratch buffers between its forward and backward; another
        # forward in between must not corrupt the first graph's gradients
        layer = make(prune=prune, dtype=F64)
        xs = [torch.randn(8, 64, dtype=F64, requires_grad=True) for _ in range(2)]
        masks = [layer.dense_mask(8, s, dtype=F64) for s in (0, 1)]
        ys = [layer(x) for x in xs]
        for x, y, mask in reversed(list(zip(xs, ys, masks, strict=True))):
            layer.weight.grad = None
            y.square().sum().backward()
            x2 = x.detach().clone().requires_grad_()
            w2 = layer.weight.detach().clone().requires_grad_()
            dense_reference(layer, x2, mask, w2, layer.bias.detach()).square().sum().backward()
            torch.testing.assert_close(x.grad, x2.grad, atol=1e-12, rtol=0)
            torch.testing.assert_close(layer.weight.grad, w2.grad, atol=1e-12, rtol=0)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_backward_twice_through_a_retained_graph_gives_the_same_gradients(self, prune):
        layer = make(prune=prune, dtype=F64)
        y = layer(torch.randn(8, 64, dtype=F64)).square().sum()
        y.backward(retain_graph=True)
        first = layer.weight.grad.clone()
        layer.weight.grad = None
        y.backward()
        torch.testing.assert_close(layer.weight.grad, first, atol=1e-12, rtol=0)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_only_the_weight_needs_a_gradient(self, prune):
        layer = make(prune=prune, dtype=F64)
        mask = layer.dense_mask(6, dtype=F64)
        x = torch.randn(6, 64, dtype=F64)
        layer(x).sum().backward()
        w = layer.weight.detach().clone().requires_grad_()
        dense_reference(layer, x, mask, w, layer.bias.detach()).sum().backward()
        torch.testing.assert_close(layer.weight.grad, w.grad, atol=1e-12, rtol=0)

    def test_no_grad_training_forward_is_pruned_too(self):
        layer = make(dtype=F64)
        mask = layer.dense_mask(6, dtype=F64)
        x = torch.randn(6, 64, dtype=F64)
        with torch.no_grad():
            y = layer(x)
        ref = dense_reference(layer, x, mask, layer.weight, layer.bias)
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


class TestGradcheck:
    @pytest.mark.parametrize("prune", ["input", "output"])
    @pytest.mark.parametrize(("in_f", "out_f", "batch", "tau"), [(12, 10, 5, 2), (9, 7, 2, 3)])
    def test_gradcheck_in_float64(self, prune, in_f, out_f, batch, tau):
        layer = make(in_f, out_f, tau=tau, bs=4, prune=prune, auto_step=False, dtype=F64)
        x = torch.randn(batch, in_f, dtype=F64, requires_grad=True)
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()

        def fn(x, w, b):
            return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

        assert torch.autograd.gradcheck(fn, (x, w, b))


class TestModes:
    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_eval_is_the_plain_linear(self, prune):
        layer = make(prune=prune).eval()
        x = torch.randn(5, 3, 64)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert int(layer.step) == 0

    def test_p_rounding_to_zero_blocks_is_the_linear_and_warns(self):
        with pytest.warns(UserWarning, match="rounds to 0 of 8 blocks"):
            layer = make(p=0.05)
        x = torch.randn(4, 64)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert int(layer.step) == 1

    def test_p_zero_is_the_linear(self):
        layer = make(p=0.0)
        x = torch.randn(4, 64)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))

    def test_empty_batch_keeps_shape(self):
        layer = make()
        x = torch.randn(0, 64, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 24)
        y.sum().backward()
        assert x.grad.shape == (0, 64)

    def test_auto_step_advances_once_per_training_forward(self):
        layer = make()
        for _ in range(3):
            layer(torch.randn(4, 64))
        assert int(layer.step) == 3

    def test_manual_stepping_holds_the_masks_until_step_is_called(self):
        layer = make(auto_step=False, steps_per_set=1, sigma=64)
        x = torch.randn(4, 64)
        first = layer(x)
        assert torch.equal(layer(x), first)
        gyrodrop.step(layer)
        assert int(layer.step) == 1
        assert not torch.equal(layer(x), first)

    def test_output_pruned_rows_are_zero_on_dropped_blocks(self):
        layer = make(10, 40, prune="output", bs=8, bias=True)
        mask = layer.dense_mask(4)
        y = layer(torch.randn(4, 10))
        assert torch.equal(y == 0, mask == 0)


class TestFromLinear:
    def test_keeps_the_same_parameters_dtype_and_training_flag(self):
        lin = nn.Linear(64, 10, dtype=F64).eval()
        rng = torch.get_rng_state()
        layer = BlockGyroLinear.from_linear(lin, p=0.25, steps_per_set=5, block_size=16)
        assert torch.equal(torch.get_rng_state(), rng)  # no re-initialization
        assert layer.weight is lin.weight and layer.bias is lin.bias
        assert layer.weight.dtype == F64 and not layer.training
        assert layer.step.device == lin.weight.device
        x = torch.randn(3, 64, dtype=F64)
        assert torch.equal(layer(x), lin(x))

    def test_linear_without_bias(self):
        layer = BlockGyroLinear.from_linear(
            nn.Linear(32, 4, bias=False), steps_per_set=1, block_size=8
        )
        assert layer.bias is None
        layer(torch.randn(3, 32)).sum().backward()

    def test_rejects_other_modules_and_derived_options(self):
        with pytest.raises(ValueError, match="expected an nn.Linear, got Conv1d"):
            BlockGyroLinear.from_linear(nn.Conv1d(2, 2, 1))
        with pytest.raises(ValueError, match="dtype comes from the Linear"):
            BlockGyroLinear.from_linear(nn.Linear(4, 4), dtype=F64)


class TestState:
    def test_state_dict_holds_parameters_step_and_seed_only(self):
        layer = make()
        layer(torch.randn(4, 64))
        assert sorted(layer.state_dict()) == [
            "_extra_state",
            "bias",
            "schedule_seed",
            "seed",
            "step",
            "weight",
        ]

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_resume_into_a_fresh_module_continues_the_same_masks(self, prune):
        torch.manual_seed(0)
        straight = make(prune=prune, steps_per_set=2, sigma=32, seed=5)
        opt = torch.optim.SGD(straight.parameters(), lr=0.1)
        xs = [torch.randn(6, 64) for _ in range(7)]
        outputs = []
        for i, x in enumerate(xs):
            if i == 3:
                saved = {k: v.clone() for k, v in straight.state_dict().items()}
            y = straight(x)
            outputs.append(y.detach())
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
        resumed = make(prune=prune, steps_per_set=2, sigma=32, seed=0)
        resumed.load_state_dict(saved)
        opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
        for i, x in enumerate(xs[3:], start=3):
            y = resumed(x)
            assert torch.equal(y.detach(), outputs[i])
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()

    def test_extra_repr_lists_hyperparameters(self):
        text = repr(make(prune="output"))
        for part in (
            "p=0.5",
            "prune=output",
            "block_size=8",
            "num_subnets=16",
            "subnets_per_step=2",
            "steps_per_set=3",
            "n_dropped=",
        ):
            assert part in text


class TestCompile:
    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_aot_eager_matches_eager_outputs_and_gradients(self, prune):
        torch._dynamo.reset()
        torch.manual_seed(0)
        eager = make(prune=prune, steps_per_set=2)
        twin = make(prune=prune, steps_per_set=2)
        twin.load_state_dict(eager.state_dict())
        compiled = torch.compile(twin, backend="aot_eager")
        for batch in (8, 8, 7, 8):
            x = torch.randn(batch, 64)
            y1, y2 = eager(x), compiled(x)
            assert torch.equal(y1, y2)
            y1.sum().backward()
            y2.sum().backward()
        # the compiled path derives its backward (the same pruned GEMMs, summed in
        # another order): equal to float rounding
        torch.testing.assert_close(twin.weight.grad, eager.weight.grad, atol=1e-5, rtol=1e-5)
        assert int(twin.step) == int(eager.step) == 4

    def test_inductor_model_matches_eager_outputs_and_gradients(self):
        torch._dynamo.reset()
        torch.manual_seed(0)

        def model():
            return nn.Sequential(make(64, 32, bs=16, seed=1), nn.ReLU(), make(32, 4, bs=8, seed=2))

        eager, twin = model(), model()
        twin.load_state_dict(eager.state_dict())
        compiled = torch.compile(twin)
        for _ in range(2):
            x = torch.randn(8, 64)
            y1, y2 = eager(x), compiled(x)
            torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
            y1.square().sum().backward()
            y2.square().sum().backward()
        for a, b in zip(eager.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)


class TestAutocast:
    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_bfloat16_autocast_runs_and_is_close_to_float32(self, prune):
        torch.manual_seed(0)
        layer = make(96, 40, bs=16, prune=prune, auto_step=False)
        x = torch.randn(16, 96, requires_grad=True)
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        ref_grad = torch.autograd.grad(ref.sum(), layer.weight)[0]
        torch.testing.assert_close(layer.weight.grad, ref_grad, atol=0.1, rtol=0.05)

    def test_bfloat16_parameters_run_without_autocast(self):
        layer = make(dtype=torch.bfloat16)
        y = layer(torch.randn(4, 64, dtype=torch.bfloat16))
        y.sum().backward()
        assert y.dtype == layer.weight.grad.dtype == torch.bfloat16


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"p": 1.0}, r"BlockGyroLinear: p must be in \[0, 1\), got 1.0"),
            ({"p": 0.99}, r"p=0.99 would drop all 8 blocks of the 64 input features"),
            ({"bs": 0}, r"block_size must be >= 1, got 0"),
            ({"prune": "both"}, r"prune must be one of \('input', 'output'\), got 'both'"),
            ({"in_f": 0}, r"in_features must be >= 1, got 0"),
            ({"out_f": 2.5}, r"out_features must be an int, got 2.5"),
            ({"bias": 1}, r"bias must be a bool, got 1"),
            ({"tau": 17}, r"subnets_per_step must be in \[1, 16\], got 17"),
            ({"schedule": "x"}, r"schedule must be one of"),
        ],
    )
    def test_bad_arguments_raise_value_error_naming_them(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            make(**kwargs)

    def test_wrong_feature_size_names_the_expected_shape(self):
        with pytest.raises(ValueError, match=r"expected input \(B, \*, 64\), got shape \(4, 63\)"):
            make()(torch.randn(4, 63))

    def test_training_needs_a_batch_dim(self):
        with pytest.raises(ValueError, match="hint: x.unsqueeze"):
            make()(torch.randn(64))
        assert make().eval()(torch.randn(64)).shape == (24,)

    def test_missing_total_steps_warns(self):
        with pytest.warns(UserWarning, match="neither total_steps nor steps_per_set"):
            BlockGyroLinear(8, 8, block_size=4)


class TestBenchmarkScript:
    def test_quick_run_prints_the_layer_and_mlp_tables(self, capsys):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_blockwise.py"
        spec = importlib.util.spec_from_file_location("bench_blockwise", path)
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        threads = torch.get_num_threads()
        sys.modules[spec.name] = bench  # dataclasses resolve annotations through it
        try:
            spec.loader.exec_module(bench)
            bench.main(["--quick", "--threads", "1"])
        finally:
            sys.modules.pop(spec.name, None)
            torch.set_num_threads(threads)
        out = capsys.readouterr().out
        assert "| 0.5 | 0.500 |" in out and "50.0%" in out  # the GEMM FLOPs halve
        assert "block-wise (input)" in out and "block-wise (auto)" in out


# --------------------------------------------------------------------------------------
# Block masks with power (issue 17): per-block frequency, uniform subsets, distinctness.


def all_masks(in_f, out_f, *, p, bs, sigma, prune="input", seed=0):
    """A layer whose single set holds all ``sigma`` subnetworks (tau = sigma): its
    ``block_masks(0)`` are every subnetwork's block mask, one per row."""
    layer = make(in_f, out_f, p=p, sigma=sigma, tau=sigma, bs=bs, prune=prune, seed=seed)
    return layer, layer.block_masks(0)


class TestBlockMaskStatistics:
    @pytest.mark.parametrize(
        "features, bs, p, prune",
        [(256, 8, 0.5, "input"), (100, 10, 0.3, "input"), (64, 4, 0.25, "output")],
    )
    def test_every_block_is_dropped_equally_often(self, features, bs, p, prune):
        # 20000 subnetworks, chi-square on per-block drop counts (exactly n_dropped per
        # mask, so the without-replacement statistic of statcheck). Catches a choice that
        # favours some blocks (block 0 dropped 62% and block 31 36% of the time is
        # hundreds of sd off) or ignores the last blocks.
        in_f, out_f = (features, 8) if prune == "input" else (8, features)
        layer, keep = all_masks(in_f, out_f, p=p, bs=bs, sigma=20_000, prune=prune, seed=4)
        dropped = (~keep).sum(0).tolist()
        assert_uniform_inclusion(dropped, 20_000, layer.n_dropped, "per-block drops")

    def test_kept_subsets_are_uniform_over_all_combinations(self):
        # 8 blocks, 4 dropped: 70 subsets, 20000 masks; Pearson over the 70. Catches a
        # choice with uniform per-block rates but favoured combinations (e.g. blocks
        # dropped in adjacent pairs).
        layer, keep = all_masks(64, 4, p=0.5, bs=8, sigma=20_000, seed=1)
        assert (layer.n_blocks, layer.n_dropped) == (8, 4)
        codes = (keep.long() << torch.arange(8)).sum(1)
        subsets = [c for c in range(256) if bin(c).count("1") == 4]
        counts = torch.bincount(codes, minlength=256)
        assert int(counts.sum()) == int(counts[subsets].sum())  # only 4-of-8 subsets
        assert_uniform_inclusion(counts[subsets].tolist(), 20_000, 1, "kept subsets")

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_sigma_subnetworks_are_sigma_distinct_masks(self, prune):
        # 32 blocks, 16 dropped: 6e8 subsets, so 512 random masks collide with
        # probability 2e-4 (birthday bound); catches masks that collapse (k and k + 1
        # sharing a mask: half as many distinct subnetworks).
        layer, keep = all_masks(256, 256, p=0.5, bs=8, sigma=512, prune=prune, seed=3)
        assert torch.unique(keep, dim=0).shape[0] == 512
        # the public per-subnetwork mask is the block mask of that id
        ids = layer.active_subnets(0)
        for row in (0, 1, 100, 511):
            want = keep[row].repeat_interleave(8).float() * layer.scale
            assert torch.equal(layer.subnet_mask(int(ids[row])), want)
        masks = torch.stack([layer.subnet_mask(k) for k in range(512)])
        assert torch.unique(masks, dim=0).shape[0] == 512

    def test_few_combinations_are_all_reached(self):
        # 5 blocks, 2 dropped: only 10 masks exist; 200 subnetworks reach all 10 (a
        # uniform choice misses one with probability 10 * 0.9**200 = 7e-9).
        _, keep = all_masks(40, 4, p=0.4, bs=8, sigma=200, seed=2)
        assert torch.unique(keep, dim=0).shape[0] == 10

    @pytest.mark.parametrize("field", ["seed", "schedule_seed"])
    def test_state_dict_with_another_seed_rebuilds_the_cached_masks(self, field):
        # The kept-block cache must be keyed on both seeds: a checkpoint with another
        # seed, loaded after a forward at the same step, must not reuse stale masks.
        torch.manual_seed(0)
        a = make(64, 8, seed=1, steps_per_set=5)
        b = make(64, 8, seed=1, steps_per_set=5)
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            getattr(b, field).fill_(2)
        x = torch.randn(4, 64)
        a(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.dense_mask(4), b.dense_mask(4))


def penalty_grads(forward, params, x):
    """WGAN-GP style: ``d/d(params, x) mean((||d sum(f(x)^2)/dx||_2 - 1)^2)`` (a gradient
    penalty, which needs the double backward of ``forward``)."""
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(forward(x).pow(2).sum(), x, create_graph=True)
    flat = g.reshape(g.shape[0], -1)
    penalty = ((flat.norm(dim=1) - 1) ** 2).mean() + (g * g.detach().sign()).sum() * 0.1
    return torch.autograd.grad(penalty, [*params, x])


class TestDoubleBackward:
    """BlockGyroLinear is twice differentiable: gradient penalties equal the dense
    reference with the layer's own mask; the first-order path stays the pruned one."""

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_case_gradient_penalty_matches_dense_reference(self, prune):
        # shared/cases/case_double_backward_block.py: error or the penalty part of dW missing
        torch.manual_seed(0)
        x = torch.randn(6, 64)
        layer = make(64, 64, sigma=8, tau=2, bs=16, prune=prune, steps_per_set=10, auto_step=False)
        mask = layer.dense_mask(6)

        def ref(t):
            return dense_reference(layer, t, mask, layer.weight, layer.bias)

        params = [layer.weight, layer.bias]
        want = penalty_grads(ref, params, x)
        got = penalty_grads(layer, params, x)
        for name, a, b in zip(("dW", "db", "dx"), got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} differs")

    @pytest.mark.parametrize("prune", ["input", "output"])
    @pytest.mark.parametrize(("in_f", "out_f", "batch", "mid", "tau", "bs"), SHAPES)
    @pytest.mark.parametrize("bias", [True, False])
    def test_penalty_equals_dense_in_float64(self, prune, in_f, out_f, batch, mid, tau, bs, bias):
        layer = make(
            in_f, out_f, tau=tau, bs=bs, prune=prune, auto_step=False, dtype=F64, bias=bias
        )
        layer.advance(4)  # another active set than the first
        x = torch.randn(batch, *mid, in_f, dtype=F64, generator=torch.Generator().manual_seed(1))
        mask = layer.dense_mask(batch, dtype=F64)
        params = [p for p in (layer.weight, layer.bias) if p is not None]

        def ref(t):
            return dense_reference(layer, t, mask, layer.weight, layer.bias)

        got = penalty_grads(layer, params, x)
        want = penalty_grads(ref, params, x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)

    @pytest.mark.parametrize("prune", ["input", "output"])
    @pytest.mark.parametrize(
        ("in_f", "out_f", "batch", "mid", "tau"),
        [(12, 10, 5, (), 2), (9, 7, 2, (), 3), (8, 6, 3, (2,), 2)],
    )
    def test_gradgradcheck_in_float64(self, prune, in_f, out_f, batch, mid, tau):
        layer = make(in_f, out_f, tau=tau, bs=4, prune=prune, auto_step=False, dtype=F64)
        x = torch.randn(batch, *mid, in_f, dtype=F64, requires_grad=True)
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()

        def fn(x, w, b):
            return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_parameter_gradient_norm_penalty(self, prune):
        # a penalty on ||dL/dW|| (create_graph w.r.t. the weights, x constant)
        layer = make(prune=prune, auto_step=False, dtype=F64)
        x = torch.randn(7, 64, dtype=F64)
        mask = layer.dense_mask(7, dtype=F64)

        def grads(forward):
            (gw,) = torch.autograd.grad(forward(x).sin().sum(), layer.weight, create_graph=True)
            return torch.autograd.grad(gw.pow(2).sum(), [layer.weight, layer.bias])

        got = grads(layer)
        want = grads(lambda t: dense_reference(layer, t, mask, layer.weight, layer.bias))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_first_order_backward_keeps_the_pruned_fast_path(self, prune, monkeypatch):
        from gyrodrop.blockwise import kernels

        graphs = []
        real = kernels._Ops.__init__

        def spy(self, graph, ws):
            graphs.append(graph)
            real(self, graph, ws)

        monkeypatch.setattr(kernels._Ops, "__init__", spy)
        layer = make(prune=prune)
        got, ref = run_both(layer, torch.randn(8, 64))
        assert_all_close(got, ref, atol=1e-5)
        assert graphs and not any(graphs)  # in place, on scratch: not the recorded path

    def test_model_gradient_penalty_through_fused_mlp_equals_dense(self):
        # a critic with an output-pruned and an input-pruned layer, nonlinear between
        torch.manual_seed(3)
        model = nn.Sequential(
            make(16, 32, bs=8, prune="output", auto_step=False, dtype=F64),
            nn.Tanh(),
            make(32, 32, bs=8, prune="input", auto_step=False, dtype=F64, seed=5),
            nn.Softplus(),
            nn.Linear(32, 1).double(),
        )
        fused = [m for m in model if isinstance(m, BlockGyroLinear)]
        x = torch.randn(6, 16, dtype=F64)
        masks = [m.dense_mask(6, dtype=F64) for m in fused]

        def dense(t):
            i = 0
            for m in model:
                if isinstance(m, BlockGyroLinear):
                    mask = masks[i]
                    i += 1
                    t = dense_reference(m, t, mask, m.weight, m.bias)
                elif not isinstance(m, nn.Identity):
                    t = m(t)
            return t

        params = list(model.parameters())
        got = penalty_grads(model, params, x)
        want = penalty_grads(dense, params, x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_gradient_penalty_under_bf16_autocast_is_close_to_dense(self, prune):
        layer = make(prune=prune, auto_step=False)
        x = torch.randn(8, 64)
        mask = layer.dense_mask(8)
        params = [layer.weight, layer.bias]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = penalty_grads(layer, params, x)
            want = penalty_grads(
                lambda t: dense_reference(layer, t, mask, layer.weight, layer.bias), params, x
            )
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype  # bf16 rounding: compare norm-wise
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.05
