"""The statistics behind the accuracy gate (checked against hand-computed values)."""

import math

import pytest

from servematrix.check.stats import OneSidedTest, bernoulli_sigma, mean_sigma_stderr, required_n, wilson


def test_threshold_and_mde_follow_the_two_sample_standard_error():
    t = OneSidedTest(reference=0.5, sigma=0.5, n=200, alpha=0.05, beta=0.2)
    se = math.sqrt(2 * 0.25 / 200)  # 0.05
    assert t.se == pytest.approx(se)
    assert t.threshold == pytest.approx(0.5 - 1.6448536 * se, abs=1e-6)
    assert t.mde == pytest.approx((1.6448536 + 0.8416212) * se, abs=1e-6)


def test_p_value_is_one_sided_and_half_at_the_reference():
    t = OneSidedTest(reference=0.5, sigma=0.5, n=200)
    assert t.p_value(0.5) == pytest.approx(0.5)
    assert t.p_value(0.5 - t.se * 1.6448536) == pytest.approx(0.05, abs=1e-4)
    assert t.p_value(0.9) > 0.99


def test_lower_is_better_metrics_fail_when_they_rise():
    t = OneSidedTest(reference=2.0, sigma=1.0, n=50, higher_is_better=False)
    assert t.passed(2.1) and not t.passed(2.5)
    assert t.threshold > 2.0


def test_required_n_detects_the_effect_it_claims():
    n = required_n(0.5, 0.05)
    assert n == math.ceil(2 * 0.25 * (1.6448536 + 0.8416212) ** 2 / 0.0025)
    assert OneSidedTest(reference=0.5, sigma=0.5, n=n).mde <= 0.05 < OneSidedTest(reference=0.5, sigma=0.5, n=n - 1).mde


def test_zero_variance_reference_makes_any_drop_fail():
    t = OneSidedTest(reference=1.0, sigma=0.0, n=10)
    assert t.passed(1.0) and not t.passed(0.9) and t.p_value(0.9) == 0.0


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bernoulli_sigma_and_sample_moments():
    assert bernoulli_sigma(0.5) == 0.5 and bernoulli_sigma(0.0) == 0.0
    mean, sigma, se = mean_sigma_stderr([1.0, 2.0, 3.0])
    assert (mean, sigma, se) == (2.0, 1.0, pytest.approx(1 / math.sqrt(3)))
