"""uncertainty_metrics: every metric against a hand computation or the library it wraps
(scikit-learn, torchmetrics, torch's Gaussian NLL) on small fixed inputs, the tie rule of
AURC, the scores, and one clear error per bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import gyrodrop
from gyrodrop import Prediction, uncertainty_metrics
from gyrodrop.uncertainty.metrics import risk_coverage

sk = pytest.importorskip("sklearn.metrics")


def classification(probs, entropy=None, mutual_info=None, variance=None):
    p = torch.as_tensor(probs, dtype=torch.float32)
    n = p.shape[0]
    h = -(torch.special.xlogy(p, p)).sum(1) if entropy is None else torch.as_tensor(entropy)
    mi = torch.zeros(n) if mutual_info is None else torch.as_tensor(mutual_info)
    var = torch.zeros(n) if variance is None else torch.as_tensor(variance)
    return Prediction(p, var.float(), h.float(), mi.float())


def regression(mean, variance, mutual_info=None):
    mean = torch.as_tensor(mean, dtype=torch.float32)
    variance = torch.as_tensor(variance, dtype=torch.float32)
    h = (0.5 * torch.log(2 * math.pi * math.e * variance)).reshape(mean.shape[0], -1).sum(1)
    mi = torch.full_like(h, math.nan) if mutual_info is None else torch.as_tensor(mutual_info)
    return Prediction(mean, variance, h, mi.float(), kind="regression")


def random_probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, c, generator=g, dtype=torch.float64), 1)


# Three rows, two classes; labels 0, 1, 1: the third row is a confident-ish mistake.
P3 = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
Y3 = torch.tensor([0, 1, 1])


class TestClassificationByHand:
    def test_accuracy_nll_brier_by_hand(self):
        m = uncertainty_metrics(classification(P3), Y3)
        assert m["accuracy"] == pytest.approx(2 / 3)
        assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
        # sum over classes: 0.02, 0.08, 0.72
        assert m["brier"] == pytest.approx((0.02 + 0.08 + 0.72) / 3)

    def test_ece_by_hand_with_equal_width_bins(self):
        # bins=2: [0, .5) is empty, [.5, 1] holds all: |acc 2/3 - conf (.9+.8+.6)/3|.
        m = uncertainty_metrics(classification(P3), Y3, bins=2)
        assert m["ece"] == pytest.approx(abs(2 / 3 - 2.3 / 3))
        # bins=10: .9 -> [.9, 1) acc 1; .8 -> [.8, .9) acc 1; .6 -> [.6, .7) acc 0.
        m = uncertainty_metrics(classification(P3), Y3, bins=10)
        assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)

    def test_confidence_one_goes_to_the_last_bin(self):
        m = uncertainty_metrics(classification([[1.0, 0.0], [0.95, 0.05]]), [0, 1], bins=10)
        # one bin [.9, 1]: acc 1/2, conf .975
        assert m["ece"] == pytest.approx(0.475)

    def test_aurc_by_hand_rejects_the_most_uncertain_first(self):
        # max_prob scores 0.1, 0.2, 0.4; the mistake is the most uncertain: risks at
        # coverage 1/3, 2/3, 1 are 0, 0, 1/3.
        m = uncertainty_metrics(classification(P3), Y3, score="max_prob")
        assert m["aurc"] == pytest.approx(1 / 9)
        # ranked the other way round (mistake most certain): 1, 1/2, 1/3
        flipped = classification(P3, entropy=[0.3, 0.2, 0.1])
        assert uncertainty_metrics(flipped, Y3)["aurc"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)

    def test_nll_of_a_zero_probability_is_finite(self):
        m = uncertainty_metrics(classification([[1.0, 0.0]]), [1])
        assert m["nll"] == pytest.approx(-math.log(1e-12))


class TestClassificationAgainstLibraries:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_accuracy_nll_and_brier_match_scikit_learn(self, seed):
        p = random_probs(200, 4, seed)
        y = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(seed))
        m = uncertainty_metrics(classification(p), y)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p.argmax(1)))
        assert m["nll"] == pytest.approx(sk.log_loss(y, p.numpy(), labels=range(4)), rel=1e-5)
        # binary: scikit-learn's Brier is the positive class's; the sum over both is twice
        p2, y2 = random_probs(200, 2, seed), (y % 2)
        m2 = uncertainty_metrics(classification(p2), y2)
        assert m2["brier"] == pytest.approx(2 * sk.brier_score_loss(y2, p2[:, 1]), rel=1e-5)

    @pytest.mark.parametrize("bins", [1, 5, 15])
    def test_ece_matches_torchmetrics(self, bins):
        tm = pytest.importorskip("torchmetrics.functional.classification")
        p = random_probs(500, 5, bins)
        y = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(7))
        m = uncertainty_metrics(classification(p), y, bins=bins)
        want = tm.multiclass_calibration_error(p, y, num_classes=5, n_bins=bins, norm="l1")
        assert m["ece"] == pytest.approx(float(want), abs=1e-6)

    def test_ood_metrics_by_hand(self):
        # scores (entropy) in: 0.1, 0.4; OOD: 0.3, 0.5. AUROC: 3 of 4 pairs ranked right.
        # AP, descending: OOD .5 (precision 1), in .4, OOD .3 (precision 2/3).
        # FPR95: flagging both OOD needs threshold .3, which flags the in-row .4 too.
        in_ = classification([[0.5, 0.5]] * 2, entropy=[0.1, 0.4])
        ood = classification([[0.5, 0.5]] * 2, entropy=[0.3, 0.5])
        m = uncertainty_metrics(in_, [0, 1], ood=ood)
        assert m["ood_auroc"] == pytest.approx(0.75)
        assert m["ood_aupr"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
        assert m["ood_fpr95"] == pytest.approx(0.5)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_ood_metrics_match_scikit_learn_on_random_scores(self, seed):
        g = torch.Generator().manual_seed(seed)
        h_in, h_out = torch.rand(60, generator=g), torch.rand(40, generator=g) + 0.3
        in_ = classification(random_probs(60, 3, seed), entropy=h_in)
        ood = classification(random_probs(40, 3, seed + 9), entropy=h_out)
        m = uncertainty_metrics(in_, torch.zeros(60, dtype=torch.long), ood=ood)
        y = np.r_[np.zeros(60), np.ones(40)]
        s = np.r_[h_in.double().numpy(), h_out.double().numpy()]
        assert m["ood_auroc"] == pytest.approx(sk.roc_auc_score(y, s))
        assert m["ood_aupr"] == pytest.approx(sk.average_precision_score(y, s))
        # FPR95 by brute force: the largest threshold flagging >= 95% of OOD rows
        t = max(v for v in s if (s[60:] >= v).mean() >= 0.95)
        assert m["ood_fpr95"] == pytest.approx((s[:60] >= t).mean())

    def test_ood_rows_that_look_certain_get_a_low_auroc(self):
        in_ = classification([[0.5, 0.5]] * 3, entropy=[0.5, 0.6, 0.7])
        ood = classification([[0.5, 0.5]] * 3, entropy=[0.1, 0.2, 0.3])
        assert uncertainty_metrics(in_, [0, 0, 0], ood=ood)["ood_auroc"] == 0.0


class TestScores:
    @pytest.mark.parametrize(
        ("score", "want"),
        [
            ("entropy", [0.3, 0.2, 0.1]),
            ("mutual_info", [0.0, 0.5, 0.9]),
            ("variance", [0.2, 0.1, 0.0]),
            ("max_prob", [0.1, 0.2, 0.4]),
        ],
    )
    def test_each_score_ranks_by_its_field(self, score, want):
        pred = classification(
            P3, entropy=[0.3, 0.2, 0.1], mutual_info=[0.0, 0.5, 0.9], variance=[0.2, 0.1, 0.0]
        )
        got = gyrodrop.uncertainty.metrics.uncertainty_score(pred, score)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
        cov, risk = risk_coverage(torch.tensor(want), torch.tensor([False, False, True]))
        m = uncertainty_metrics(pred, Y3, score=score)
        assert m["aurc"] == pytest.approx(float(risk.mean()))


class TestAurcTies:
    def brute_force(self, u, err):
        """The mean, over every order of the rows that keeps ``u`` ascending, of the
        mean risk over k = 1..N."""
        n, total, count = len(u), 0.0, 0
        for perm in itertools.permutations(range(n)):
            if any(u[perm[i]] > u[perm[i + 1]] for i in range(n - 1)):
                continue
            e = [err[i] for i in perm]
            total += sum(sum(e[:k]) / k for k in range(1, n + 1)) / n
            count += 1
        return total / count

    @pytest.mark.parametrize(
        ("u", "err"),
        [
            ([0.1, 0.1], [0, 1]),
            ([0.2, 0.1, 0.1, 0.3], [1, 0, 1, 0]),
            ([0.5, 0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1, 0]),
            ([0.1, 0.2, 0.2, 0.2, 0.9, 0.9], [0, 1, 0, 0, 1, 1]),
        ],
    )
    def test_tied_rows_take_the_expected_risk_over_their_orders(self, u, err):
        _, risk = risk_coverage(torch.tensor(u), torch.tensor(err))
        assert float(risk.mean()) == pytest.approx(self.brute_force(u, err))

    def test_the_value_does_not_depend_on_the_row_order(self):
        g = torch.Generator().manual_seed(3)
        u = torch.randint(0, 4, (50,), generator=g).double()  # many ties
        err = torch.rand(50, generator=g) < 0.3
        perm = torch.randperm(50, generator=g)
        a = risk_coverage(u, err)[1].mean()
        b = risk_coverage(u[perm], err[perm])[1].mean()
        assert float(a) == pytest.approx(float(b), abs=1e-12)

    def test_all_tied_scores_give_the_error_rate_at_every_coverage(self):
        _, risk = risk_coverage(torch.zeros(4), torch.tensor([1, 0, 0, 0]))
        torch.testing.assert_close(risk, torch.full((4,), 0.25, dtype=torch.float64))


class TestRegression:
    def test_rmse_and_gaussian_nll_by_hand(self):
        pred = regression([[1.0], [2.0]], [[0.5], [2.0]])
        m = uncertainty_metrics(pred, torch.tensor([[2.0], [2.0]]))
        assert m["rmse"] == pytest.approx(math.sqrt(0.5))
        nll = 0.5 * ((math.log(2 * math.pi * 0.5) + 1 / 0.5) + math.log(2 * math.pi * 2.0)) / 2
        assert m["nll"] == pytest.approx(nll)
        assert set(m) == {"rmse", "nll"}

    def test_gaussian_nll_matches_torch_on_two_outputs(self):
        g = torch.Generator().manual_seed(0)
        mean, var, y = (
            torch.randn(30, 2, generator=g),
            torch.rand(30, 2, generator=g),
            torch.randn(30, 2, generator=g),
        )
        m = uncertainty_metrics(regression(mean, var), y)
        want = nn.GaussianNLLLoss(full=True)(mean, y, var)
        assert m["nll"] == pytest.approx(float(want), rel=1e-5)
        assert m["rmse"] == pytest.approx(float(((mean - y) ** 2).mean().sqrt()), rel=1e-6)

    def test_targets_of_shape_n_fit_a_one_output_mean(self):
        pred = regression([[1.0], [2.0]], [[1.0], [1.0]])
        a = uncertainty_metrics(pred, torch.tensor([1.5, 2.5]))
        b = uncertainty_metrics(pred, torch.tensor([[1.5], [2.5]]))
        assert a == b

    def test_ood_by_variance(self):
        in_ = regression([0.0, 0.0], [0.1, 0.2])
        ood = regression([0.0, 0.0], [1.0, 2.0])
        m = uncertainty_metrics(in_, [0.0, 0.0], ood=ood, score="variance")
        assert m["ood_auroc"] == 1.0 and m["ood_fpr95"] == 0.0

    def test_max_prob_and_mutual_info_without_a_model_variance_are_refused(self):
        pred = regression([0.0, 1.0], [0.1, 0.2])
        with pytest.raises(ValueError, match="score='max_prob' needs class probabilities"):
            uncertainty_metrics(pred, [0.0, 1.0], score="max_prob")
        with pytest.raises(ValueError, match="mutual_info' needs a model that predicts"):
            uncertainty_metrics(pred, [0.0, 1.0], score="mutual_info")


class TestEndToEnd:
    def test_mc_dropout_and_subnet_ensemble_give_every_metric_in_range(self):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(6, 32),
            nn.ReLU(),
            gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=1),
            nn.Linear(32, 3),
        )
        x, y, x_ood = torch.randn(40, 6), torch.randint(0, 3, (40,)), 4 * torch.randn(20, 6)
        for predict in (
            lambda t: gyrodrop.mc_predict(net, t, samples=8),
            lambda t: gyrodrop.subnet_ensemble_predict(net, t),
        ):
            for score in ("entropy", "mutual_info", "max_prob", "variance"):
                m = uncertainty_metrics(predict(x), y, ood=predict(x_ood), score=score)
                assert set(m) == {
                    "accuracy", "nll", "brier", "ece", "aurc",
                    "ood_auroc", "ood_aupr", "ood_fpr95",
                }  # fmt: skip
                assert all(math.isfinite(v) for v in m.values())
                for k in ("accuracy", "ece", "aurc", "ood_auroc", "ood_aupr", "ood_fpr95"):
                    assert 0.0 <= m[k] <= 1.0, k
                assert 0.0 <= m["brier"] <= 2.0


class TestBadInput:
    def test_labels_out_of_range(self):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 2\).*got 2"):
            uncertainty_metrics(classification(P3), [0, 1, 2])
        with pytest.raises(ValueError, match=r"labels must be in \[0, 2\).*got -1"):
            uncertainty_metrics(classification(P3), [0, -1, 1])

    @pytest.mark.parametrize("labels", [None, ["a", "b", "c"], [[0], [1, 1], []], object()])
    def test_labels_that_are_not_a_tensor_name_labels(self, labels):
        # None, strings, ragged lists: one ValueError naming labels, not torch's own.
        with pytest.raises(ValueError, match="uncertainty_metrics: labels must be"):
            uncertainty_metrics(classification(P3), labels)
        with pytest.raises(ValueError, match="uncertainty_metrics: labels must be"):
            uncertainty_metrics(regression([[0.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]]), labels)

    def test_labels_that_are_not_integers(self):
        with pytest.raises(ValueError, match="labels must be integer class indices"):
            uncertainty_metrics(classification(P3), torch.tensor([0.0, 1.0, 1.0]))

    @pytest.mark.parametrize("labels", [[0, 1], [[0, 1, 1]], [0, 1, 1, 0]])
    def test_labels_whose_shape_does_not_match(self, labels):
        with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
            uncertainty_metrics(classification(P3), labels)

    def test_regression_targets_whose_shape_does_not_match(self):
        with pytest.raises(ValueError, match="targets shaped like the prediction's mean"):
            uncertainty_metrics(regression([[0.0, 1.0]], [[1.0, 1.0]]), [0.0, 1.0, 2.0])

    def test_empty_ood_set(self):
        empty = classification(torch.zeros(0, 2))
        with pytest.raises(
            ValueError, match="ood must have at least one row, but the OOD set is empty"
        ):
            uncertainty_metrics(classification(P3), Y3, ood=empty)

    def test_ood_of_another_kind_or_class_count(self):
        with pytest.raises(ValueError, match="ood must be a prediction of the same model"):
            uncertainty_metrics(classification(P3), Y3, ood=classification([[0.2, 0.3, 0.5]]))
        with pytest.raises(ValueError, match="ood must be a prediction of the same model"):
            uncertainty_metrics(classification(P3), Y3, ood=regression([[0.0, 1.0]], [[1.0, 1.0]]))

    def test_unknown_score(self):
        with pytest.raises(
            ValueError,
            match=r"score must be one of \('entropy', 'mutual_info', 'max_prob', "
            r"'variance'\), got 'bald'",
        ):
            uncertainty_metrics(classification(P3), Y3, score="bald")

    @pytest.mark.parametrize("bins", [0, -1, 2.5, True])
    def test_bins_not_a_positive_int(self, bins):
        with pytest.raises(ValueError, match="bins must be"):
            uncertainty_metrics(classification(P3), Y3, bins=bins)

    def test_not_a_prediction(self):
        with pytest.raises(ValueError, match="prediction must be a gyrodrop.Prediction"):
            uncertainty_metrics(torch.tensor(P3), Y3)
        with pytest.raises(ValueError, match="ood must be a gyrodrop.Prediction"):
            uncertainty_metrics(classification(P3), Y3, ood=torch.tensor(P3))


class TestPredictionFromPasses:
    def test_equals_mc_predict_on_the_same_passes(self):
        g = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(4, 5, 3, generator=g, dtype=torch.float64), -1)
        pred = Prediction.from_passes(probs)
        mean = probs.mean(0)
        torch.testing.assert_close(pred.mean, mean.float())
        h = -(mean * mean.log()).sum(-1)
        mi = h + (probs * probs.log()).sum(-1).mean(0)
        torch.testing.assert_close(pred.entropy, h.float())
        torch.testing.assert_close(pred.mutual_info, mi.float())

    @pytest.mark.parametrize(
        "probs", [torch.zeros(2, 3), torch.zeros(0, 2, 2), torch.full((2, 2, 2), -1.0)]
    )
    def test_bad_probabilities_are_refused(self, probs):
        with pytest.raises(ValueError, match="Prediction.from_passes"):
            Prediction.from_passes(probs)
