"""Exact acceptance bounds for the statistical tests, at one stated false-alarm rate.

Every random choice in gyrodrop is a hash of integers, so a statistical test here is
deterministic: it draws the same sample every run. ``ALPHA`` is the probability that a
*correct* implementation would have drawn a sample this test rejects, had the seeds been
picked at random; with fixed seeds the outcome never changes, and the samples are large
so that a rate 10% off fails by many standard deviations (each test says how many).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import binomtest, chi2, norm

ALPHA = 1e-6  # false-alarm rate of every bound below


def assert_rate(hits: int, n: int, p: float, what: str) -> None:
    """``hits`` of ``n`` independent draws at rate ``p``: exact two-sided binomial test."""
    pvalue = binomtest(hits, n, p).pvalue
    got = f"{hits}/{n} = {hits / n:.4f}"
    assert pvalue > ALPHA, f"{what}: {got}, expected {p} (p-value {pvalue:.2g})"


def assert_poisson_binomial(hits: int, rates: Sequence[float], what: str) -> None:
    """``hits`` of independent draws at the given (different) rates: normal bound on the
    Poisson-binomial count, ``|hits - mean| <= z * sd + 1`` with ``z`` at ``ALPHA``."""
    mean = sum(rates)
    sd = math.sqrt(sum(r * (1 - r) for r in rates))
    z = norm.isf(ALPHA / 2)
    assert abs(hits - mean) <= z * sd + 1, f"{what}: {hits} hits, expected {mean:.1f} +- {sd:.1f}"


def assert_uniform_inclusion(counts: Sequence[int], draws: int, chosen: int, what: str) -> None:
    """``draws`` independent subsets of ``chosen`` of ``n = len(counts)`` items, each
    subset uniform; ``counts[i]``: how often item ``i`` was chosen.

    Each count is Binomial(draws, q) with ``q = chosen / n`` and the counts sum to
    ``draws * chosen``; their covariance is ``draws q (1 - q) n / (n - 1) (I - J / n)``,
    so ``T = (n - 1) / n * sum (O - E)**2 / (draws q (1 - q))`` is chi-square with
    ``n - 1`` degrees of freedom (``chosen = 1`` is Pearson's test).
    """
    n = len(counts)
    q = chosen / n
    expected = draws * q
    stat = (n - 1) / n * sum((c - expected) ** 2 for c in counts) / (draws * q * (1 - q))
    bound = chi2.isf(ALPHA, n - 1)
    worst = max(range(n), key=lambda i: abs(counts[i] - expected))
    assert stat <= bound, (
        f"{what}: chi-square {stat:.1f} > {bound:.1f} ({n - 1} dof); item {worst} chosen "
        f"{counts[worst]} times, expected {expected:.1f}"
    )


def assert_independent_rates(counts: Sequence[int], draws: int, p: float, what: str) -> None:
    """``counts[i]`` ~ Binomial(draws, p), independent: chi-square with ``len`` dof."""
    expected = draws * p
    stat = sum((c - expected) ** 2 for c in counts) / (draws * p * (1 - p))
    bound = chi2.isf(ALPHA, len(counts))
    assert stat <= bound, f"{what}: chi-square {stat:.1f} > {bound:.1f} ({len(counts)} dof)"
