"""The statistics behind the accuracy gate (checked against hand-computed values)."""

import math

import pytest

from servematrix.stats import OneSidedTest, bernoulli_sigma, mean_sigma_stderr, required_n, wilson


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


# --- paired tests ----------------------------------------------------------------------------------
def test_mcnemar_exact_matches_the_binomial_tail_of_the_discordant_pairs():
    from servematrix.stats import mcnemar

    # 8 of 10 discordant pairs against the layout: P(X >= 8 | Bin(10, 1/2)) = (45 + 10 + 1) / 1024
    assert mcnemar(8, 2) == pytest.approx(56 / 1024)
    assert mcnemar(5, 0) == pytest.approx(1 / 32)
    assert mcnemar(0, 5) == pytest.approx(1.0)  # every flip in the layout's favour: no evidence against it
    assert mcnemar(3, 3) == pytest.approx(42 / 64)  # P(X >= 3 | Bin(6, 1/2))
    assert mcnemar(0, 0) == 1.0  # no discordant pair: nothing to test


def test_a_paired_test_detects_a_shift_the_unpaired_test_misses():
    from servematrix.stats import paired_shift_p

    # 24 questions whose NLL spreads 0.3 around 1.4; the layout adds 0.05 nats/token to every one
    base = [1.4 + 0.3 * math.sin(i * 1.7) for i in range(24)]
    layout = [b + 0.05 + 0.002 * math.cos(i) for i, b in enumerate(base)]
    mean_b, sigma_b, _ = mean_sigma_stderr(base)
    mean_l = sum(layout) / len(layout)
    unpaired = OneSidedTest(reference=mean_b, sigma=sigma_b, n=24, higher_is_better=False)
    assert unpaired.passed(mean_l) and unpaired.p_value(mean_l) > 0.2  # lost in the question-to-question spread
    assert paired_shift_p(layout, base, tolerance=0.01) < 1e-10  # the same shift, question by question
    assert paired_shift_p(base, base, tolerance=0.01) == 1.0  # identical layouts: no shift
    noise = [b + 1e-6 * math.sin(i * 3.1) for i, b in enumerate(base)]
    assert paired_shift_p(noise, base, tolerance=0.01) > 0.5  # float noise is within the tolerance


def test_paired_t_test_is_scipys_ttest_rel_shifted_by_the_tolerance():
    from scipy.stats import ttest_rel

    from servematrix.stats import paired_shift_p

    a, b = [2.0, 2.3, 1.9, 2.6, 2.2], [1.9, 2.0, 2.0, 2.1, 2.0]
    expected = ttest_rel([x - 0.05 for x in a], b, alternative="greater").pvalue
    assert paired_shift_p(a, b, 0.05) == pytest.approx(expected)


def test_paired_n_is_far_below_the_unpaired_n_when_the_differences_spread_less():
    from servematrix.stats import mcnemar_required_n, paired_mde, paired_required_n

    unpaired = required_n(0.32, 0.05)  # two independent samples of σ 0.32
    paired = paired_required_n(0.02, 0.05)  # differences of σ 0.02
    assert unpaired == 507 and paired == 1  # 2·0.32²·(z.95 + z.8)²/0.05² vs (0.02·(z.95 + z.8)/0.05)²
    assert paired_mde(0.02, paired) <= 0.05 < paired_mde(0.02, paired - 1)
    # McNemar (Connor 1987): 10% of questions flip, detect a 5-point drop
    n = mcnemar_required_n(0.10, 0.05)
    root = 1.6448536 * math.sqrt(0.10) + 0.8416212 * math.sqrt(0.10 - 0.0025)
    assert n == math.ceil(root ** 2 / 0.0025)
    assert n < required_n(bernoulli_sigma(0.5), 0.05)
