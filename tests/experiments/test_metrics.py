"""Tests for gyrodrop.experiments.metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from gyrodrop.experiments import metrics as M

PROBS = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
Y = torch.tensor([0, 1, 1, 1])


class TestAccuracy:
    def test_fraction_of_argmax_hits(self) -> None:
        assert M.accuracy(PROBS, Y) == 0.75


class TestNll:
    def test_mean_negative_log_probability_of_the_label(self) -> None:
        expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4
        assert M.nll(PROBS, Y) == pytest.approx(expected)

    def test_zero_probability_is_finite(self) -> None:
        assert math.isfinite(M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


class TestBrier:
    def test_sum_of_squared_errors_over_classes(self) -> None:
        expected = (2 * 0.1**2 + 2 * 0.2**2 + 2 * 0.6**2 + 2 * 0.3**2) / 4
        assert M.brier(PROBS, Y) == pytest.approx(expected)


class TestEce:
    def test_perfectly_calibrated_bins_give_zero(self) -> None:
        probs = torch.tensor([[0.75, 0.25]] * 4)
        assert M.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)

    def test_overconfident_predictions(self) -> None:
        probs = torch.tensor([[0.95, 0.05]] * 2)
        assert M.ece(probs, torch.tensor([0, 1])) == pytest.approx(0.45)

    def test_bins_count_every_example(self) -> None:
        table = M.reliability_bins(PROBS, Y, bins=15)
        assert len(table) == 15 and sum(n for _, _, n in table) == 4


class TestSummary:
    def test_prefixed_keys(self) -> None:
        assert set(M.summary(PROBS, Y, "mc_")) == {"mc_acc", "mc_nll", "mc_ece", "mc_brier"}
