"""What mc_predict / subnet_ensemble_predict take from the model (``output=``):
probabilities are checked (negative values or rows not summing to 1 are refused,
naming output='logits'), and regression outputs give the predictive mean and variance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop.uncertainty.passes import PROB_TOL


def gyro(**kw):
    return gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1, seed=2, **kw)


def classifier(head, drop=None, features=16, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(features, 32), nn.ReLU(), drop or gyro(), nn.Linear(32, classes), *head
    )


PREDICTORS = {
    "mc_predict": lambda net, x, **kw: gyrodrop.mc_predict(net, x, samples=4, **kw),
    "subnet_ensemble_predict": lambda net, x, **kw: gyrodrop.subnet_ensemble_predict(net, x, **kw),
}


def test_case_mc_probs_not_probs():
    """shared/cases/round3/case_mc_probs_not_probs.py: log-probabilities passed as
    output="probs" are refused (they gave an all-zero mean and zero entropy)."""
    net = classifier([nn.LogSoftmax(-1)])
    refused = pytest.raises(ValueError, match="output='probs' needs probabilities.*'logits'")
    with refused, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gyrodrop.mc_predict(net, torch.randn(5, 16), samples=4, output="probs")


class TestProbabilitiesAreChecked:
    @pytest.mark.parametrize("name", PREDICTORS)
    @pytest.mark.parametrize(
        ("head", "found"),
        [
            ([], "a value of -"),  # logits
            ([nn.LogSoftmax(-1)], "a value of -"),  # log-probabilities
            ([nn.Softplus()], "a row summing to"),  # positive scores
            ([nn.Sigmoid()], "a row summing to"),  # multi-label probabilities
        ],
    )
    def test_scores_that_are_not_probabilities_are_refused(self, name, head, found):
        net = classifier(head)
        with pytest.raises(ValueError) as err:
            PREDICTORS[name](net, torch.randn(6, 16), output="probs")
        msg = str(err.value)
        assert msg.startswith(f"{name}: output='probs' needs probabilities")
        assert found in msg and "within 0.001" in msg and "output='logits'" in msg

    @pytest.mark.parametrize("name", PREDICTORS)
    @pytest.mark.parametrize("head", [[], [nn.LogSoftmax(-1)]])
    def test_logits_and_log_probs_with_output_logits_equal_softmax_probs(self, name, head):
        x = torch.randn(6, 16)
        want = PREDICTORS[name](classifier([nn.Softmax(-1)]), x, output="probs")
        got = PREDICTORS[name](classifier(head), x, output="logits")
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def test_dropout_models_are_checked_too(self):
        net = classifier([nn.LogSoftmax(-1)], drop=nn.Dropout(0.5))
        with pytest.raises(ValueError, match="output='logits'"):
            gyrodrop.mc_predict(net, torch.randn(6, 16), samples=3, output="probs")

    @pytest.mark.parametrize("name", PREDICTORS)
    def test_rounding_within_the_tolerance_is_accepted_and_renormalized(self, name):
        class Off(nn.Module):  # a value of -0.5 tol, rows summing to 1 + 0.5 tol
            def forward(self, p):
                q = p.clone()
                q[:, 1] += q[:, 0] + PROB_TOL
                q[:, 0] = -0.5 * PROB_TOL
                return q

        net = classifier([nn.Softmax(-1), Off()])
        pred = PREDICTORS[name](net, torch.randn(6, 16), output="probs")
        torch.testing.assert_close(pred.mean.sum(1), torch.ones(6))
        assert bool((pred.mean >= 0).all())

    @pytest.mark.parametrize("scale", [1 + 3 * PROB_TOL, 1 - 3 * PROB_TOL])
    def test_rows_just_outside_the_tolerance_are_refused(self, scale):
        class Scale(nn.Module):
            def forward(self, p):
                return p * scale

        net = classifier([nn.Softmax(-1), Scale()])
        with pytest.raises(ValueError, match="a row summing to"):
            gyrodrop.subnet_ensemble_predict(net, torch.randn(6, 16), output="probs")

    def test_half_precision_probabilities_get_a_wider_tolerance(self):
        class Half(nn.Module):
            def forward(self, p):
                return (p * (1 + 4 * PROB_TOL)).half()  # off by 4e-3 < 1e-2

        net = classifier([nn.Softmax(-1), Half()])
        pred = gyrodrop.subnet_ensemble_predict(net, torch.randn(6, 16), output="probs")
        torch.testing.assert_close(pred.mean.sum(1), torch.ones(6))


class PassTable(nn.Module):
    """Per-pass regression outputs from a table: row ``s * N + n`` is pass ``s`` of
    example ``n`` (all passes in one forward); an unused dropout makes it stochastic."""

    def __init__(self, mu, var=None):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.mu, self.var = mu, var

    def forward(self, x):
        self.drop(x)
        return self.mu if self.var is None else (self.mu, self.var)


def predict_table(mu, var=None):
    passes, n = mu.shape[:2]
    flat = lambda t: None if t is None else t.reshape(passes * n, *t.shape[2:])  # noqa: E731
    net = PassTable(flat(mu), flat(var))
    return gyrodrop.mc_predict(
        net, torch.zeros(n, 1), samples=passes, batch_samples=passes, output="regression"
    )


class TestRegression:
    def test_mean_and_between_pass_variance_by_hand(self):
        # 3 passes, 2 examples, one output: means (1, 2, 6) and (0, 0, 0).
        mu = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 0.0]])
        pred = predict_table(mu)
        torch.testing.assert_close(pred.mean, torch.tensor([3.0, 0.0]))
        var = np.var([1.0, 2.0, 6.0])  # population variance over passes: 14/3
        torch.testing.assert_close(pred.variance, torch.tensor([var, 0.0], dtype=torch.float32))
        torch.testing.assert_close(pred.epistemic, pred.variance)
        torch.testing.assert_close(pred.aleatoric, torch.zeros(2))
        h = 0.5 * math.log(2 * math.pi * math.e * var)
        assert float(pred.entropy[0]) == pytest.approx(h, rel=1e-6)
        assert pred.kind == "regression" and bool(pred.mutual_info.isnan().all())

    def test_the_models_own_variance_is_added(self):
        # 2 passes, 1 example, 2 outputs; predicted variances (1, 4) and (3, 0).
        mu = torch.tensor([[[0.0, 10.0]], [[2.0, 10.0]]])
        var = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]]])
        pred = predict_table(mu, var)
        torch.testing.assert_close(pred.mean, torch.tensor([[1.0, 10.0]]))
        torch.testing.assert_close(pred.epistemic, torch.tensor([[1.0, 0.0]]))
        torch.testing.assert_close(pred.aleatoric, torch.tensor([[2.0, 2.0]]))
        torch.testing.assert_close(pred.variance, torch.tensor([[3.0, 2.0]]))
        h = 0.5 * (math.log(2 * math.pi * math.e * 3.0) + math.log(2 * math.pi * math.e * 2.0))
        assert float(pred.entropy[0]) == pytest.approx(h, rel=1e-6)
        # Gaussian mutual information: 0.5 log(1 + epistemic / aleatoric), summed
        assert float(pred.mutual_info[0]) == pytest.approx(0.5 * math.log(1.5), rel=1e-6)

    @pytest.mark.parametrize("name", PREDICTORS)
    def test_a_gyro_regressor_with_both_predictors(self, name):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), gyro(), nn.Linear(32, 2))
        x = torch.randn(5, 4)
        pred = PREDICTORS[name](net, x, output="regression")
        assert pred.mean.shape == (5, 2) and pred.variance.shape == (5, 2)
        assert pred.entropy.shape == (5,) and bool((pred.variance > 0).all())
        m = gyrodrop.uncertainty_metrics(pred, torch.zeros(5, 2), score="variance")
        assert set(m) == {"rmse", "nll"} and all(math.isfinite(v) for v in m.values())

    def test_a_mean_and_variance_head(self):
        class Heteroscedastic(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), gyro())
                self.mu, self.log_var = nn.Linear(16, 1), nn.Linear(16, 1)

            def forward(self, x):
                h = self.body(x)
                return self.mu(h).squeeze(1), self.log_var(h).exp().squeeze(1)

        torch.manual_seed(1)
        pred = gyrodrop.subnet_ensemble_predict(
            Heteroscedastic(), torch.randn(7, 3), output="regression"
        )
        assert pred.mean.shape == (7,) and pred.variance.shape == (7,)
        torch.testing.assert_close(pred.variance, pred.epistemic + pred.aleatoric)
        assert bool((pred.mutual_info >= 0).all()) and bool((pred.aleatoric > 0).all())
        m = gyrodrop.uncertainty_metrics(pred, torch.zeros(7), score="mutual_info")
        assert math.isfinite(m["nll"])

    def test_a_negative_variance_is_refused(self):
        mu, var = torch.zeros(2, 1, 1), -torch.ones(2, 1, 1)
        with pytest.raises(ValueError, match="variance must be >= 0.*exp\\(log_variance\\)"):
            predict_table(mu, var)

    def test_a_variance_of_another_shape_is_refused(self):
        net = PassTable(torch.zeros(2, 2), torch.ones(2, 1))
        with pytest.raises(ValueError, match=r"variance shaped like the mean \(2, 2\)"):
            gyrodrop.mc_predict(net, torch.zeros(1, 1), samples=2, output="regression")

    def test_outputs_of_more_dims_are_refused(self):
        net = PassTable(torch.zeros(2, 2, 2))
        with pytest.raises(ValueError, match=r"must return a mean \(rows,\) or \(rows, D\)"):
            gyrodrop.mc_predict(net, torch.zeros(1, 1), samples=2, output="regression")

    def test_pickles_and_copies_keep_the_regression_fields(self):
        import copy
        import pickle

        pred = predict_table(torch.tensor([[1.0], [3.0]]))
        for other in (copy.deepcopy(pred), pickle.loads(pickle.dumps(pred))):
            assert other.kind == "regression"
            torch.testing.assert_close(other.epistemic, pred.epistemic)
