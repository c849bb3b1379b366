"""mc_predict and subnet_ensemble_predict: identities, isolation, determinism, and which
subnetworks the passes use."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop import Prediction
from gyrodrop.stochastic_depth import StochasticDepthBlock
from statcheck import assert_independent_rates, assert_rate


def gyro(seed=1, sigma=8, tau=2, steps_per_set=5, p=0.5, **kw):
    return gyrodrop.GyroDropout(p, sigma, tau, steps_per_set=steps_per_set, seed=seed, **kw)


def mlp(drop, width=32, classes=4, bn=True):
    """Linear -> [BN] -> ReLU -> drop -> Linear."""
    layers = [nn.Linear(5, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), drop, nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def inputs(n=6, features=5, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps, rows=8):
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(inputs(rows, seed=100 + i))
    return model


class Residual(nn.Module):
    """A ResidualBlock-protocol block for stochastic depth."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def branch(self, x):
        return self.fc(x)

    def shortcut(self, x):
        return x

    def forward(self, x):
        return x + self.fc(x)


def sd_net(mode="block"):
    net = nn.Sequential(nn.Linear(5, 8), Residual(8), Residual(8), nn.Linear(8, 3))
    gyrodrop.apply_stochastic_depth(net, drop_rate=0.5, mode=mode, drop_distribution="uniform")
    return net


class TestPrediction:
    def test_is_a_named_tuple_of_the_four_summaries(self):
        assert gyrodrop.Prediction._fields == ("mean", "variance", "entropy", "mutual_info")


class TestMcPredict:
    @pytest.mark.parametrize("seed", range(4))
    def test_entropy_bounds_mutual_information_which_is_non_negative(self, seed):
        torch.manual_seed(seed)
        net = mlp(nn.Dropout(0.5))
        pred = gyrodrop.mc_predict(net, inputs(9, seed=seed), samples=12, seed=seed)
        assert pred.mean.shape == (9, 4)
        assert all(t.shape == (9,) for t in pred[1:])
        assert torch.allclose(pred.mean.sum(1), torch.ones(9), atol=1e-6)
        assert bool((pred.mutual_info >= 0).all() and (pred.entropy >= pred.mutual_info).all())
        assert bool((pred.variance >= 0).all()) and float(pred.mutual_info.max()) > 0
        assert float(pred.entropy.max()) <= torch.log(torch.tensor(4.0)).item() + 1e-6

    def test_without_dropout_all_passes_agree_and_it_warns(self):
        net = mlp(nn.Identity())
        with pytest.warns(UserWarning, match="no dropout-family layer"):
            pred = gyrodrop.mc_predict(net, inputs(), samples=5)
        assert float(pred.mutual_info.abs().max()) < 1e-6
        assert float(pred.variance.max()) < 1e-12
        expected = torch.softmax(net.eval()(inputs()), dim=1)
        assert torch.allclose(pred.mean, expected, atol=1e-6)

    def test_batchnorm_statistics_are_untouched(self):
        net = train_steps(mlp(nn.Dropout(0.5)), 3)
        bn = copy.deepcopy(net[1].state_dict())
        gyrodrop.mc_predict(net, inputs(), samples=10)
        assert all(torch.equal(v, net[1].state_dict()[k]) for k, v in bn.items())

    def test_rows_do_not_interact_batchnorm_runs_on_its_statistics(self):
        net = train_steps(mlp(gyro()), 3)
        x = inputs(6)
        alone = gyrodrop.mc_predict(net, x[:1], samples=5, seed=2)
        together = gyrodrop.mc_predict(net, x, samples=5, seed=2)
        assert torch.allclose(alone.mean[0], together.mean[0], atol=1e-6)

    def test_modes_are_restored_exactly(self):
        net = mlp(nn.Dropout(0.5))
        net.train()
        net[1].eval()  # a frozen BatchNorm inside a training model
        before = [m.training for m in net.modules()]
        gyrodrop.mc_predict(net, inputs(), samples=3)
        assert [m.training for m in net.modules()] == before
        net.eval()
        gyrodrop.mc_predict(net, inputs(), samples=3)
        assert not any(m.training for m in net.modules())

    def test_state_is_restored_when_the_model_raises(self):
        class Flaky(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = mlp(gyro())
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls == 2:
                    raise RuntimeError("boom")
                return self.net(x)

        model = train_steps(Flaky(), 0)
        model.train()
        x = inputs()
        layer = model.net[3]
        gyrodrop.step(model, 3)
        rng = torch.get_rng_state()
        with pytest.raises(RuntimeError, match="boom"):
            gyrodrop.mc_predict(model, x, samples=3, batch_samples=1)
        assert all(m.training for m in model.modules())
        assert int(layer.step) == 3
        assert torch.equal(torch.get_rng_state(), rng)
        model.eval()
        assert torch.equal(model.net(x), model.net(x))  # no mask hook left behind
        assert torch.equal(layer(x), x)

    def test_steps_and_the_global_random_state_are_untouched(self):
        net = train_steps(nn.Sequential(*mlp(gyro()), StochasticDepthBlock(Residual(4), 0.5)), 2)
        steps = [int(m.step) for m in net.modules() if isinstance(m, gyrodrop.StochasticDepth)]
        steps += [int(m.step) for m in net.modules() if isinstance(m, gyrodrop.GyroDropout)]
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        gyrodrop.mc_predict(net, inputs(), samples=6)
        assert torch.equal(torch.rand(3), expected)
        after = [int(m.step) for m in net.modules() if isinstance(m, gyrodrop.StochasticDepth)]
        after += [int(m.step) for m in net.modules() if isinstance(m, gyrodrop.GyroDropout)]
        assert after == steps

    def test_same_seed_same_result_other_seed_other_result(self):
        net = mlp(nn.Dropout(0.5))
        x = inputs()
        a = gyrodrop.mc_predict(net, x, samples=8, seed=1)
        b = gyrodrop.mc_predict(net, x, samples=8, seed=1)
        c = gyrodrop.mc_predict(net, x, samples=8, seed=2)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert not torch.equal(a.mean, c.mean)

    @pytest.mark.parametrize(
        "make", [lambda: mlp(gyro()), lambda: sd_net("block"), lambda: sd_net("sample")]
    )
    def test_gyro_and_stochastic_depth_do_not_depend_on_the_chunking(self, make):
        net = make()
        x = inputs()
        whole = gyrodrop.mc_predict(net, x, samples=10, seed=3)
        chunked = gyrodrop.mc_predict(net, x, samples=10, seed=3, batch_samples=3)
        assert torch.allclose(whole.mean, chunked.mean, atol=1e-6)
        assert torch.allclose(whole.mutual_info, chunked.mutual_info, atol=1e-6)

    def test_stochastic_depth_is_sampled(self):
        for mode in ("block", "sample"):
            pred = gyrodrop.mc_predict(sd_net(mode), inputs(), samples=16, seed=0)
            assert float(pred.mutual_info.max()) > 1e-4

    @pytest.mark.parametrize("mode", ["block", "sample"])
    def test_block_mode_decides_per_pass_sample_mode_per_row(self, mode):
        net = nn.Sequential(StochasticDepthBlock(Residual(3), 0.5, mode, seed=4))
        with torch.no_grad():
            net[0].block.fc.weight.zero_()
            net[0].block.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        # each pass adds 0 or 2 to class 0's logit
        pred = gyrodrop.mc_predict(net, torch.zeros(6, 3), samples=40)
        rows_agree = bool((pred.mean == pred.mean[0]).all())
        assert rows_agree == (mode == "block")
        assert float(pred.mutual_info.min()) > 0

    def test_gyro_passes_use_trained_subnetworks_one_per_pass(self):
        layer = gyro(p=0.5, sigma=4, tau=2)
        net = nn.Sequential(layer)
        x = torch.ones(3, 6)
        pred = gyrodrop.mc_predict(net, x, samples=4, output="logits")
        expected = torch.stack([torch.softmax(layer.subnet_mask(k, x), 0) for k in range(4)])
        assert torch.allclose(pred.mean, expected.mean(0).expand(3, 6), atol=1e-6)

    def test_sigma_gyro_samples_equal_the_subnet_ensemble(self):
        net = train_steps(mlp(gyro(sigma=6, tau=2)), 4)
        x = inputs()
        mc = gyrodrop.mc_predict(net, x, samples=6)
        ens = gyrodrop.subnet_ensemble_predict(net, x)
        assert torch.allclose(mc.mean, ens.mean, atol=1e-6)

    def test_block_gyro_linear_is_sampled(self):
        net = nn.Sequential(
            nn.Linear(5, 64),
            nn.ReLU(),
            gyrodrop.BlockGyroLinear(64, 3, p=0.5, num_subnets=8, block_size=16, steps_per_set=2),
        )
        pred = gyrodrop.mc_predict(net, inputs(), samples=8)
        assert float(pred.mutual_info.max()) > 0

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"samples": 0}, r"mc_predict: samples must be >= 1, got 0"),
            ({"batch_samples": 0}, r"mc_predict: batch_samples must be >= 1"),
            ({"output": "logprobs"}, r"mc_predict: output must be one of"),
            ({"seed": -1}, r"mc_predict: seed must be in"),
            ({"pairing": "random"}, r"mc_predict: pairing must be one of"),
        ],
    )
    def test_invalid_arguments_are_rejected(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            gyrodrop.mc_predict(mlp(nn.Dropout(0.5)), inputs(), **kwargs)

    def test_inputs_and_outputs_of_the_wrong_shape_are_rejected(self):
        with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, \*\)"):
            gyrodrop.mc_predict(mlp(nn.Dropout(0.5)), torch.tensor(1.0))
        flat = nn.Sequential(nn.Linear(5, 1), nn.Dropout(0.5), nn.Flatten(0))
        with pytest.raises(ValueError, match=r"must return a tensor of shape \(rows, classes\)"):
            gyrodrop.mc_predict(flat, inputs())


def parallel_gyro(sigma=8, tau=2, steps_per_set=3):
    """Two gyro layers side by side on the input: the logits show both masks."""

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = gyro(seed=11, sigma=sigma, tau=tau, steps_per_set=steps_per_set)
            self.b = gyro(seed=22, sigma=sigma, tau=tau, steps_per_set=steps_per_set)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    return Parallel()


class TestSubnetEnsemblePredict:
    def test_is_deterministic_and_leaves_the_model_as_it_was(self):
        net = train_steps(mlp(gyro()), 3)
        net.train()
        state = copy.deepcopy(net.state_dict())
        x = inputs()
        a = gyrodrop.subnet_ensemble_predict(net, x)
        b = gyrodrop.subnet_ensemble_predict(net, x)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert all(m.training for m in net.modules())
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())

    def test_averages_the_subnetworks_of_a_single_layer(self):
        layer = gyro(sigma=5, tau=1)
        head = nn.Linear(6, 3)
        net = nn.Sequential(layer, head)
        x = inputs(4, 6)
        pred = gyrodrop.subnet_ensemble_predict(net, x)
        per_subnet = torch.stack(
            [torch.softmax(head(x * layer.subnet_mask(k, x)), 1) for k in range(5)]
        )
        assert torch.allclose(pred.mean, per_subnet.mean(0), atol=1e-6)
        assert bool((pred.entropy >= pred.mutual_info).all() and (pred.mutual_info >= 0).all())

    def test_trained_pairing_uses_the_combinations_trained_together(self):
        net = parallel_gyro(sigma=8, tau=2, steps_per_set=3)
        x = torch.ones(4, 6)
        trained = set()
        for step in range(12):  # one cycle: 8 / 2 sets of 3 steps
            ma, mb = net.a.active_masks(x, step), net.b.active_masks(x, step)
            trained |= {(tuple(ma[g].tolist()), tuple(mb[g].tolist())) for g in range(2)}
        net.train()
        with torch.no_grad():
            for _ in range(12):
                net(inputs(4, 6))
        rows = {"output": "probs", "output_fn": lambda o: o / o.sum(1, keepdim=True)}
        pred = gyrodrop.subnet_ensemble_predict(net, x[:1], pairing="trained", **rows)
        expected = torch.stack([torch.tensor(a + b) for a, b in trained])
        expected = expected / expected.sum(1, keepdim=True)
        assert len(trained) == 8
        assert torch.allclose(pred.mean[0], expected.mean(0).float(), atol=1e-6)
        index = gyrodrop.subnet_ensemble_predict(net, x[:1], pairing="index", **rows)
        assert not torch.allclose(index.mean, pred.mean, atol=1e-4)

    def test_trained_pairing_needs_one_shared_schedule(self):
        net = nn.Sequential(
            nn.Linear(5, 8), gyro(sigma=8), nn.Linear(8, 8), gyro(sigma=4), nn.Linear(8, 3)
        )
        with pytest.raises(ValueError, match="pairing='trained' needs one shared schedule"):
            gyrodrop.subnet_ensemble_predict(net, inputs(), pairing="trained")
        with pytest.warns(UserWarning, match="pairing='auto' used 'index'"):
            pred = gyrodrop.subnet_ensemble_predict(net, inputs())  # auto: falls back
        assert pred.mean.shape == (6, 3) and pred.pairing == "index"

    def test_other_stochastic_layers_are_off(self):
        net = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), gyro(), nn.Linear(8, 3))
        x = inputs()
        a = gyrodrop.subnet_ensemble_predict(net, x)
        b = gyrodrop.subnet_ensemble_predict(net, x)
        assert torch.equal(a.mean, b.mean)

    @pytest.mark.parametrize("prune", ["input", "output"])
    def test_block_gyro_linear_members_are_its_block_masks(self, prune):
        layer = gyrodrop.BlockGyroLinear(
            8, 6, p=0.5, num_subnets=4, subnets_per_step=2, block_size=2, steps_per_set=1,
            prune=prune,
        )  # fmt: skip
        net = nn.Sequential(layer)
        x = inputs(2, 8)
        masks = {}
        for step in range(2):  # two sets of two: all four subnetworks
            ids = layer.active_subnets(step).tolist()
            for g, k in enumerate(ids):
                masks[k] = layer.group_masks(step)[g]

        def member(k):
            if prune == "input":
                return nn.functional.linear(x * masks[k], layer.weight, layer.bias)
            return nn.functional.linear(x, layer.weight, layer.bias) * masks[k]

        expected = torch.stack([torch.softmax(member(k), 1) for k in range(4)]).mean(0)
        pred = gyrodrop.subnet_ensemble_predict(net, x, pairing="index")
        assert torch.allclose(pred.mean, expected, atol=1e-6)

    def test_a_seeded_subset_is_reproducible(self):
        net = mlp(gyro(sigma=8))
        x = inputs()
        a = gyrodrop.subnet_ensemble_predict(net, x, subnets=3, seed=5)
        b = gyrodrop.subnet_ensemble_predict(net, x, subnets=3, seed=5)
        assert torch.equal(a.mean, b.mean)
        full = gyrodrop.subnet_ensemble_predict(net, x)
        assert torch.allclose(gyrodrop.subnet_ensemble_predict(net, x, subnets=8).mean, full.mean)
        explicit = gyrodrop.subnet_ensemble_predict(net, x, subnets=list(range(8)))
        assert torch.allclose(explicit.mean, full.mean)

    def test_one_subnetwork_has_no_disagreement(self):
        pred = gyrodrop.subnet_ensemble_predict(mlp(gyro()), inputs(), subnets=[3])
        assert float(pred.mutual_info.max()) == 0.0 and float(pred.variance.max()) == 0.0

    def test_chunking_does_not_change_the_result(self):
        net = mlp(gyro(sigma=7, tau=1))
        x = inputs()
        a = gyrodrop.subnet_ensemble_predict(net, x)
        b = gyrodrop.subnet_ensemble_predict(net, x, batch_subnets=2)
        assert torch.allclose(a.mean, b.mean, atol=1e-6)

    def test_a_model_without_gyro_layers_is_an_error(self):
        with pytest.raises(ValueError, match="no GyroDropout or BlockGyroLinear layer"):
            gyrodrop.subnet_ensemble_predict(mlp(nn.Dropout(0.5)), inputs())

    @pytest.mark.parametrize(
        "subnets, message",
        [
            (0, r"subnets must be in \[1, 8\], got 0"),
            (9, r"subnets must be in \[1, 8\], got 9"),
            ([1, 1], r"subnets must be distinct ints in \[0, 8\)"),
            ([8], r"subnets must be distinct ints in \[0, 8\)"),
            ([], r"subnets must be distinct ints"),
            ("all", r"subnets must be None, an int or a sequence of ints"),
        ],
    )
    def test_invalid_subnets_are_rejected(self, subnets, message):
        with pytest.raises(ValueError, match=message):
            gyrodrop.subnet_ensemble_predict(mlp(gyro(sigma=8)), inputs(), subnets=subnets)


# --------------------------------------------------------------------------------------
# The summaries pinned to hand-computed values (issue 17).


class Table(nn.Module):
    """Returns a fixed table of class scores whatever the input: with ``batch_samples``
    equal to the number of passes, row ``s * N + n`` is pass ``s`` of example ``n``. An
    ``nn.Dropout`` (its output unused) makes it a dropout model for ``mc_predict``."""

    def __init__(self, table):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.register_buffer("table", table)

    def forward(self, x):
        self.drop(x)
        return self.table


def by_hand(probs):
    """mean, variance, entropy, mutual_info of passes ``probs`` (S, N, C), in numpy."""
    mean = probs.mean(0)
    variance = ((probs - mean) ** 2).mean(0).mean(-1)  # population variance, class mean
    entropy = -(mean * np.log(mean)).sum(-1)
    expected_entropy = -(probs * np.log(probs)).sum(-1).mean(0)
    return mean, variance, entropy, entropy - expected_entropy


def predict_table(probs, output="probs"):
    passes, n, c = probs.shape
    scores = probs if output == "probs" else np.log(probs) + 0.7  # logits up to a shift
    net = Table(torch.tensor(scores.reshape(passes * n, c), dtype=torch.float64))
    return gyrodrop.mc_predict(
        net, torch.zeros(n, 1), samples=passes, batch_samples=passes, output=output
    )


class TestSummariesByHand:
    @pytest.mark.parametrize("output", ["probs", "logits"])
    def test_each_summary_equals_the_numpy_formula(self, output):
        # 3 passes, 2 examples, 3 classes. Catches a summary summed instead of averaged
        # over passes, std instead of variance, variance summed over classes, sample
        # (S - 1) instead of population variance, a halved or swapped mutual_info.
        probs = np.array(
            [
                [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]],
                [[0.1, 0.8, 0.1], [0.25, 0.35, 0.4]],
                [[0.5, 0.25, 0.25], [0.2, 0.5, 0.3]],
            ]
        )
        pred = predict_table(probs, output)
        for name, got, want in zip(Prediction._fields, pred, by_hand(probs), strict=True):
            assert got.dtype == torch.float32, name
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7, err_msg=name)

    def test_two_confident_disagreeing_passes_have_known_values(self):
        # Passes (1, 0) and (0, 1): mean (1/2, 1/2), variance 1/4, entropy = mutual
        # information = ln 2; one agreeing example: variance and mutual_info 0.
        probs = np.array([[[1.0, 0.0], [0.6, 0.4]], [[0.0, 1.0], [0.6, 0.4]]])
        pred = predict_table(probs)
        torch.testing.assert_close(pred.mean, torch.tensor([[0.5, 0.5], [0.6, 0.4]]))
        torch.testing.assert_close(pred.variance, torch.tensor([0.25, 0.0]))
        h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
        torch.testing.assert_close(pred.entropy, torch.tensor([math.log(2), h]))
        torch.testing.assert_close(pred.mutual_info, torch.tensor([math.log(2), 0.0]))


class KeptReadout(nn.Module):
    """Class scores (1, 0) where the stochastic-depth branch was kept, (0, 1) where it
    was dropped: ``mc_predict(..., output="probs").mean[:, 0]`` is the kept fraction."""

    def forward(self, y):
        kept = (y[:, :1] != 0).to(y.dtype)
        return torch.cat([kept, 1 - kept], dim=1)


class TestMonteCarloStochasticDepthRate:
    @pytest.mark.parametrize("p", [0.2, 0.5, 0.7])
    def test_block_mode_drops_a_pass_at_rate_p(self, p):
        # 1e5 passes of one example: 0.45 instead of 0.5 is 32 sd off. Catches MC draws
        # thresholded at another rate, or one decision reused for every pass.
        net = nn.Sequential(gyrodrop.StochasticDepth(p, "block", seed=3), KeptReadout())
        n = 100_000
        pred = gyrodrop.mc_predict(net, torch.ones(1, 1), samples=n, seed=5, output="probs")
        dropped = round((1 - float(pred.mean[0, 0])) * n)
        assert_rate(dropped, n, p, "Monte-Carlo block-mode drops")

    @pytest.mark.parametrize("p", [0.2, 0.5, 0.7])
    def test_sample_mode_drops_a_row_of_a_pass_at_rate_p(self, p):
        # 1000 examples x 100 passes = 1e5 decisions; also every example's rate alone
        # (chi-square over the 1000 examples: no example is favoured).
        net = nn.Sequential(gyrodrop.StochasticDepth(p, "sample", seed=3), KeptReadout())
        rows, passes = 1000, 100
        pred = gyrodrop.mc_predict(net, torch.ones(rows, 1), samples=passes, output="probs")
        per_row = [round((1 - float(k)) * passes) for k in pred.mean[:, 0]]
        assert_rate(sum(per_row), rows * passes, p, "Monte-Carlo sample-mode drops")
        assert_independent_rates(per_row, passes, p, "Monte-Carlo drops per example")


# Fused inference paths, reshaped rows, pairing (issue 11, section 3)

import pickle  # noqa: E402
import warnings  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gyrodrop.gyro import apply_group_masks  # noqa: E402


class Encoder(nn.Module):
    """A torch.nn transformer classifier over (B, T, d) inputs."""

    def __init__(self, nhead=2, d=16, batch_first=True, norm_first=False, layers=1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d, nhead, 32, dropout=0.3, batch_first=batch_first, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.batch_first = batch_first
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class Decoder(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(d, 2, 32, dropout=0.3, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.dec(x, x).mean(1))


def seq(n=5, t=7, d=16, seed=0):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))


def recorded(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(i.message) for i in w]


class TestFusedInferencePaths:
    @pytest.mark.parametrize("nhead", [1, 2])
    def test_case_transformer_encoder_layer_dropout_children_are_sampled(self, nhead):
        # shared/cases/case_mc_transformer_fastpath.py: nhead=2 took the fused fast path,
        # mutual information exactly 0
        torch.manual_seed(0)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = nn.TransformerEncoderLayer(16, nhead, 32, dropout=0.3, batch_first=True)
                self.head = nn.Linear(16, 3)

            def forward(self, x):
                return self.head(self.enc(x).mean(1))

        net = Net().eval()
        pred, msgs = recorded(lambda: gyrodrop.mc_predict(net, seq(), samples=10, seed=0))
        assert float(pred.mutual_info.max()) > 0 and float(pred.variance.max()) > 1e-8
        assert not any("identical" in m for m in msgs)
        assert not net.training and not net.enc.training  # modes restored

    @pytest.mark.parametrize(
        "make",
        [
            lambda: Encoder(layers=2),
            lambda: Encoder(norm_first=True),
            lambda: Encoder(batch_first=False),
            Decoder,
        ],
        ids=["encoder-stack", "norm-first", "seq-first", "decoder-layer"],
    )
    def test_torch_transformer_models_are_sampled(self, make):
        torch.manual_seed(1)
        net = make().eval()
        pred, msgs = recorded(lambda: gyrodrop.mc_predict(net, seq(), samples=6, seed=0))
        assert float(pred.mutual_info.max()) > 0
        assert not any("identical" in m or "never called" in m for m in msgs)

    def test_multihead_attention_dropout_is_part_of_the_family(self):
        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
                self.head = nn.Linear(16, 3)

            def forward(self, x):
                return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

        torch.manual_seed(2)
        net = Attn().eval()
        pred, msgs = recorded(lambda: gyrodrop.mc_predict(net, seq(), samples=6))
        assert float(pred.mutual_info.max()) > 0 and not msgs
        assert not net.attn.training
        again = gyrodrop.mc_predict(net, seq(), samples=6)
        assert torch.equal(pred.mean, again.mean)  # seeded

    @pytest.mark.parametrize("batch_first", [True, False])
    def test_gyro_transformer_subnet_ensemble_uses_the_subnetworks(self, batch_first):
        torch.manual_seed(3)
        net = Encoder(batch_first=batch_first)
        gyrodrop.apply_gyro_dropout(net, num_subnets=4, subnets_per_step=2, total_steps=10)
        net.eval()
        for fn in (
            lambda: gyrodrop.subnet_ensemble_predict(net, seq()),
            lambda: gyrodrop.mc_predict(net, seq(), samples=4),
        ):
            pred, msgs = recorded(fn)
            assert float(pred.mutual_info.max()) > 0, msgs
            assert not any("identical" in m or "never called" in m for m in msgs)
        # one pass per forward gives the same ensemble: rows are grouped by pass
        one = gyrodrop.subnet_ensemble_predict(net, seq(), batch_subnets=1)
        many = gyrodrop.subnet_ensemble_predict(net, seq())
        torch.testing.assert_close(one.mean, many.mean, atol=1e-6, rtol=0)

    def test_all_identical_passes_warn(self):
        class Dead(nn.Module):  # the dropout's output never reaches the result
            def __init__(self):
                super().__init__()
                self.fc, self.drop = nn.Linear(5, 3), nn.Dropout(0.5)

            def forward(self, x):
                self.drop(x)
                return self.fc(x)

        with pytest.warns(UserWarning, match="all 4 passes gave identical outputs"):
            gyrodrop.mc_predict(Dead(), inputs(), samples=4)

    def test_dropout_never_called_is_named(self):
        class Unused(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.drop, self.spare = nn.Linear(5, 3), nn.Dropout(0.5), nn.Dropout()

            def forward(self, x):
                return self.fc(self.drop(x))

        with pytest.warns(UserWarning, match=r"1 dropout layer\(s\) were never called.*spare"):
            gyrodrop.mc_predict(Unused(), inputs(), samples=3)

    def test_hf_bert_is_sampled_and_functional_attention_dropout_is_named(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=8,
            num_labels=3,
        )
        torch.manual_seed(4)
        model = transformers.BertForSequenceClassification(cfg).eval()

        class Logits(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, ids):
                return self.model(input_ids=ids).logits

        ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
        pred, msgs = recorded(lambda: gyrodrop.mc_predict(Logits(), ids, samples=4))
        assert float(pred.mutual_info.max()) > 0
        assert any("never called" in m and "attention.self.dropout" in m for m in msgs)

    def test_hf_vit_gyro_ensemble(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.2,
            num_labels=3,
        )
        torch.manual_seed(5)
        model = transformers.ViTForImageClassification(cfg)
        gyrodrop.apply_gyro_dropout(model, num_subnets=4, subnets_per_step=2, total_steps=10)

        class Logits(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(pixel_values=x).logits

        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        pred = gyrodrop.subnet_ensemble_predict(Logits(), x)
        assert pred.mean.shape == (3, 3) and float(pred.mutual_info.max()) > 0
        one = gyrodrop.subnet_ensemble_predict(Logits(), x, batch_subnets=1)
        torch.testing.assert_close(one.mean, pred.mean, atol=1e-6, rtol=0)


class Flat(nn.Module):
    """The dropout sees (B*T, H) rows (shared/cases/case_uncertainty_reshaped_rows.py)."""

    def __init__(self, drop=None):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), drop or nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.drop(torch.relu(self.fc1(x.reshape(b * t, 4))))
        return self.fc2(h).reshape(b, t, 3).mean(1)


class Windows(nn.Module):
    """Swin-like: (B, 4, 4, C) cut into 2x2 windows, (B*4, 4, C) rows at the dropout."""

    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.head = nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        b = x.shape[0]
        w = x.reshape(b, 2, 2, 2, 2, 2).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, 2)
        h = self.drop(torch.relu(self.fc(w)))
        return self.head(h.reshape(b, 16, 8).mean(1))


def reference_ensemble(net, x, layer, members):
    """Each member's mask on all rows of the layer, one forward per member."""
    outs = []
    for j in members:

        def hook(_m, args, j=j):
            t = args[0]
            return (t * layer.subnet_mask(j, t),)

        handle = layer.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                outs.append(torch.softmax(net.eval()(x).double(), -1))
        finally:
            handle.remove()
    return torch.stack(outs).mean(0).float()


class TestReshapedRows:
    def test_case_flattened_rows(self):
        torch.manual_seed(0)
        net = Flat()
        x = torch.randn(5, 6, 4)
        assert gyrodrop.mc_predict(net, x, samples=4).mean.shape == (5, 3)
        gyrodrop.apply_gyro_dropout(net, num_subnets=8, subnets_per_step=2, total_steps=100)
        net.train()
        assert net(x).shape == (5, 3)
        assert gyrodrop.mc_predict(net, x, samples=4).mean.shape == (5, 3)
        pred = gyrodrop.subnet_ensemble_predict(net, x)
        assert pred.mean.shape == (5, 3)
        want = reference_ensemble(net, x, net.drop, range(8))
        torch.testing.assert_close(pred.mean, want, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("make", [Flat, Windows], ids=["flat", "windows"])
    def test_gyro_passes_match_one_pass_per_forward(self, make):
        torch.manual_seed(1)
        net = make()
        gyrodrop.apply_gyro_dropout(net, num_subnets=4, subnets_per_step=2, total_steps=10)
        x = torch.randn(3, 6, 4) if make is Flat else torch.randn(3, 4, 4, 2)
        a = gyrodrop.mc_predict(net, x, samples=6, seed=3)
        b = gyrodrop.mc_predict(net, x, samples=6, seed=3, batch_samples=1)
        torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=0)
        ens = gyrodrop.subnet_ensemble_predict(net, x)
        torch.testing.assert_close(
            ens.mean, reference_ensemble(net, x, net.drop, range(4)), atol=1e-6, rtol=0
        )

    def test_sequence_first_rows_equal_to_passes_times_batch_are_not_mistaken(self):
        # (T, passes * B, d) inside the model with T == passes * B: dim 0 is time, not
        # the passes; one pass per forward must give the same ensemble
        torch.manual_seed(6)
        net = Encoder(batch_first=False)
        gyrodrop.apply_gyro_dropout(net, num_subnets=4, subnets_per_step=2, total_steps=10)
        x = seq(n=1, t=4)
        many = gyrodrop.subnet_ensemble_predict(net, x, batch_subnets=4)
        one = gyrodrop.subnet_ensemble_predict(net, x, batch_subnets=1)
        torch.testing.assert_close(many.mean, one.mean, atol=1e-6, rtol=0)
        net.enc.layers[0].self_attn.dropout = 0.0  # no nn.Dropout-like randomness left
        a = gyrodrop.mc_predict(net, x, samples=8, batch_samples=4)
        b = gyrodrop.mc_predict(net, x, samples=8, batch_samples=1)
        torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("mode", ["block", "sample"])
    def test_stochastic_depth_on_flattened_rows(self, mode):
        torch.manual_seed(2)
        net = Flat(gyrodrop.StochasticDepth(0.5, mode, seed=1))
        x = torch.randn(4, 3, 4)
        a = gyrodrop.mc_predict(net, x, samples=8, seed=1)
        b = gyrodrop.mc_predict(net, x, samples=8, seed=1, batch_samples=1)
        torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=0)
        assert float(a.mutual_info.max()) > 0


class TestApplyGroupMasks:
    def test_case_counts_that_do_not_cover_the_batch_raise(self):
        with pytest.raises(ValueError, match=r"counts \[3, 3\] sum to 6 rows but x has 12"):
            apply_group_masks(torch.ones(12, 2), torch.ones(2, 2), [3, 3])

    @pytest.mark.parametrize("counts", [[3, 4], [-1, 7], [6], [2, 2, 2], [3.0, 3]], ids=str)
    def test_bad_counts_raise(self, counts):
        with pytest.raises(ValueError, match="apply_group_masks: counts"):
            apply_group_masks(torch.ones(6, 2), torch.ones(2, 2), counts)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(0, 3))
    def test_every_row_gets_its_group_mask_or_it_raises(self, counts, extra):
        rows = sum(counts) + extra
        masks = torch.arange(1, len(counts) + 1, dtype=torch.float64)[:, None]
        x = torch.ones(rows, 2, dtype=torch.float64)
        if extra:
            with pytest.raises(ValueError, match="sum to"):
                apply_group_masks(x, masks, counts)
            return
        y = apply_group_masks(x, masks, counts)
        want = torch.repeat_interleave(masks[:, 0], torch.tensor(counts))
        assert y.shape == x.shape and torch.equal(y[:, 0], want)

    def test_local_group_counts_refuse_a_window_outside_the_batch(self):
        from gyrodrop.distributed import local_group_counts

        assert sum(local_group_counts(4, 4, 8, 3)) == 4
        with pytest.raises(ValueError, match="local_group_counts"):
            local_group_counts(6, 4, 8, 3)


class TestPairingIsReported:
    def test_one_schedule_reports_trained(self):
        net = mlp(gyro())
        pred, msgs = recorded(lambda: gyrodrop.subnet_ensemble_predict(net, inputs()))
        assert pred.pairing == "trained" and "share one schedule" in pred.pairing_reason
        assert not msgs

    def test_auto_falling_back_to_index_warns_and_says_why(self):
        net = nn.Sequential(
            nn.Linear(5, 8), gyro(sigma=4), nn.Linear(8, 8), gyro(sigma=8), nn.Linear(8, 3)
        )
        for fn in (gyrodrop.subnet_ensemble_predict, gyrodrop.mc_predict):
            with pytest.warns(UserWarning, match="pairing='auto' used 'index' because"):
                pred = fn(net, inputs())
            assert pred.pairing == "index" and "differ" in pred.pairing_reason

    def test_explicit_pairing_is_reported_without_warning(self):
        net = mlp(gyro())
        pred, msgs = recorded(
            lambda: gyrodrop.subnet_ensemble_predict(net, inputs(), pairing="index")
        )
        assert (pred.pairing, pred.pairing_reason, msgs) == ("index", "", [])

    def test_prediction_stays_a_four_tuple_and_keeps_the_pairing_on_copy(self):
        pred = gyrodrop.subnet_ensemble_predict(mlp(gyro()), inputs())
        mean, variance, entropy, mutual_info = pred
        assert len(pred) == 4 and mean is pred.mean
        for other in (pickle.loads(pickle.dumps(pred)), copy.deepcopy(pred)):
            assert other.pairing == "trained" and torch.equal(other.mean, pred.mean)
        plain = gyrodrop.mc_predict(mlp(nn.Dropout(0.5)), inputs(), samples=2)
        assert plain.pairing is None
