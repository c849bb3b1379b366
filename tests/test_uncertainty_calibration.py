"""fit_temperature (a closed form, recovering a known scale, a local minimum of the NLL)
and the temperature= option of mc_predict / subnet_ensemble_predict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop import fit_temperature


def nll(logits, labels, t):
    return float(nn.functional.cross_entropy(logits.double() / t, labels))


class TestFitTemperature:
    @pytest.mark.parametrize(("a", "q"), [(3.0, 0.75), (1.0, 0.9), (5.0, 0.6)])
    def test_two_classes_have_the_closed_form(self, a, q):
        # Every row has logits (a, 0) and a fraction q is labelled 0: the NLL is minimal
        # where sigmoid(a / T) = q, so T = a / logit(q).
        n = 20
        k = round(q * n)
        logits = torch.tensor([[a, 0.0]] * n)
        labels = torch.tensor([0] * k + [1] * (n - k))
        want = a / math.log((k / n) / (1 - k / n))
        assert fit_temperature(logits, labels) == pytest.approx(want, rel=1e-5)

    def test_recovers_the_scale_of_overconfident_logits(self):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(20_000, 5, generator=g)
        labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
        assert fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.05)
        assert fit_temperature(z / 2, labels) == pytest.approx(0.5, rel=0.05)

    def test_the_fit_is_a_minimum_of_the_validation_nll(self):
        g = torch.Generator().manual_seed(1)
        z = torch.randn(300, 4, generator=g)
        labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
        logits = 4 * z
        t = fit_temperature(logits, labels)
        assert t > 0
        for factor in (0.9, 0.99, 1.01, 1.1):
            assert nll(logits, labels, t) <= nll(logits, labels, t * factor) + 1e-12

    def test_returns_a_float_and_keeps_the_inputs(self):
        logits, labels = torch.randn(10, 3), torch.arange(10) % 3
        before = logits.clone()
        t = fit_temperature(logits, labels)
        assert isinstance(t, float) and torch.equal(logits, before)

    @pytest.mark.parametrize(
        ("logits", "labels", "match"),
        [
            (torch.randn(4), torch.zeros(4, dtype=torch.long), r"logits must be a tensor \(N, C\)"),
            (
                torch.zeros(0, 3),
                torch.zeros(0, dtype=torch.long),
                r"logits must be a tensor \(N, C\)",
            ),
            (torch.tensor([[0.0, math.nan]]), torch.tensor([0]), "logits must be finite"),
            (
                torch.ones(2, 3, dtype=torch.long),
                torch.tensor([0, 1]),
                "logits must be floating point",
            ),
            (torch.randn(2, 3), torch.tensor([0, 3]), r"labels must be in \[0, 3\).*got 3"),
            (torch.randn(2, 3), torch.tensor([0, -1]), r"labels must be in \[0, 3\).*got -1"),
            (torch.randn(2, 3), torch.tensor([0, 1, 2]), r"labels must have shape \(2,\)"),
            (torch.randn(2, 3), torch.tensor([0.0, 1.0]), "labels must be integer class indices"),
        ],
    )
    def test_bad_input_is_refused(self, logits, labels, match):
        with pytest.raises(ValueError, match=f"fit_temperature: {match}"):
            fit_temperature(logits, labels)


def gyro_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.ReLU(),
        gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=3),
        nn.Linear(16, 4),
    )


class Scaled(nn.Module):
    def __init__(self, net, t):
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x):
        return self.net(x) / self.t


PREDICTORS = {
    "mc_predict": lambda net, x, **kw: gyrodrop.mc_predict(net, x, samples=6, **kw),
    "subnet_ensemble_predict": lambda net, x, **kw: gyrodrop.subnet_ensemble_predict(net, x, **kw),
}


@pytest.mark.parametrize("labels", [None, ["a", "b"], [[0], [1, 1]], object()])
def test_fit_temperature_labels_that_are_not_a_tensor_name_labels(labels):
    with pytest.raises(ValueError, match="fit_temperature: labels must be"):
        fit_temperature(torch.zeros(2, 3), labels)


class TestTemperatureOption:
    @pytest.mark.parametrize("name", PREDICTORS)
    @pytest.mark.parametrize("t", [0.5, 2.0, 7])
    def test_divides_each_pass_logits_before_the_softmax(self, name, t):
        predict, net, x = PREDICTORS[name], gyro_net(), torch.randn(7, 5)
        got = predict(net, x, temperature=t)
        want = predict(Scaled(net, t), x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        base = predict(net, x)
        assert torch.equal(got.mean.argmax(1), base.mean.argmax(1)) or t == 7
        assert not torch.allclose(got.mean, base.mean)

    @pytest.mark.parametrize("name", PREDICTORS)
    def test_temperature_one_is_the_default(self, name):
        predict, net, x = PREDICTORS[name], gyro_net(), torch.randn(7, 5)
        assert torch.equal(predict(net, x, temperature=1.0).mean, predict(net, x).mean)

    @pytest.mark.parametrize("name", PREDICTORS)
    @pytest.mark.parametrize("t", [0, -1.0, math.nan, math.inf, True, "2"])
    def test_a_temperature_that_is_not_positive_is_refused(self, name, t):
        with pytest.raises(ValueError, match=f"{name}: temperature must be a finite number > 0"):
            PREDICTORS[name](gyro_net(), torch.randn(3, 5), temperature=t)

    @pytest.mark.parametrize("name", PREDICTORS)
    @pytest.mark.parametrize("output", ["probs", "regression"])
    def test_a_temperature_needs_logits(self, name, output):
        with pytest.raises(ValueError, match="temperature divides logits .* needs output='logits'"):
            PREDICTORS[name](gyro_net(), torch.randn(3, 5), output=output, temperature=2.0)

    def test_fitted_temperature_lowers_the_nll_of_an_overconfident_ensemble(self):
        g = torch.Generator().manual_seed(4)
        net = gyro_net()
        with torch.no_grad():
            net[-1].weight.mul_(25)  # overconfident
        x, y = torch.randn(400, 5, generator=g), torch.randint(0, 4, (400,), generator=g)
        net.eval()
        with torch.no_grad():
            t = fit_temperature(net(x[:200]), y[:200])
        before = gyrodrop.subnet_ensemble_predict(net, x[200:])
        after = gyrodrop.subnet_ensemble_predict(net, x[200:], temperature=t)
        m0, m1 = (gyrodrop.uncertainty_metrics(p, y[200:]) for p in (before, after))
        assert t > 1 and m1["nll"] < m0["nll"]
