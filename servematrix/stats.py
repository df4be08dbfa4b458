"""All of servematrix's statistics, in one place.

An accuracy check is a one-sided test of the measured mean against a reference mean, in the
manner of TensorRT-LLM's accuracy_core: both means come from n samples with per-sample standard
deviation σ, so their difference has standard error sqrt(2σ²/n). With significance α and power
1-β that gives a threshold, a minimum detectable effect and a p-value; the Wilson interval is
reported beside it for proportions.

A base module (arithmetic only, no stage imported): config asks it whether a check can fail at all
(config/power.py) and check judges measured runs with it (check/accuracy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_N = NormalDist()


def z(q: float) -> float:
    return _N.inv_cdf(q)


@dataclass(frozen=True)
class OneSidedTest:
    reference: float
    sigma: float  # per-sample standard deviation
    n: int
    alpha: float = 0.05
    beta: float = 0.2
    higher_is_better: bool = True

    @property
    def se(self) -> float:
        return math.sqrt(2 * self.sigma ** 2 / self.n) if self.n > 0 else math.inf

    @property
    def threshold(self) -> float:
        margin = z(1 - self.alpha) * self.se
        return self.reference - margin if self.higher_is_better else self.reference + margin

    @property
    def mde(self) -> float:
        """The smallest true drop this n detects with probability 1-β."""
        return (z(1 - self.alpha) + z(1 - self.beta)) * self.se

    def p_value(self, measured: float) -> float:
        """P(a result at least this bad | no real change)."""
        worse = (self.reference - measured) if self.higher_is_better else (measured - self.reference)
        if self.se == 0:
            return 0.0 if worse > 0 else 1.0
        return 1 - _N.cdf(worse / self.se)

    def passed(self, measured: float) -> bool:
        return measured >= self.threshold if self.higher_is_better else measured <= self.threshold


def required_n(sigma: float, effect: float, alpha: float = 0.05, beta: float = 0.2) -> int:
    """Samples per side for OneSidedTest to detect a true change of `effect`."""
    if effect <= 0:
        raise ValueError("effect must be > 0")
    return max(1, math.ceil(2 * sigma ** 2 * (z(1 - alpha) + z(1 - beta)) ** 2 / effect ** 2))


def bernoulli_sigma(p: float) -> float:
    return math.sqrt(max(p * (1 - p), 0.0))


def wilson(k: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1-α) Wilson score interval for k successes in n trials; its low end is the
    one-sided (1-α/2) lower bound."""
    if n == 0:
        return 0.0, 1.0
    zz = z(1 - alpha / 2)
    p = k / n
    denom = 1 + zz ** 2 / n
    centre = (p + zz ** 2 / (2 * n)) / denom
    half = zz * math.sqrt(p * (1 - p) / n + zz ** 2 / (4 * n ** 2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_sigma_stderr(values: list[float]) -> tuple[float, float, float]:
    """Mean, per-sample (sample) standard deviation and standard error of the mean."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), math.sqrt(var / n)


# --- paired tests: a layout against its baseline on the same questions ------------------------------
# Both layouts answered the same questions, so the question-to-question spread cancels: what is
# tested is the per-question difference, whose spread is far smaller than either side's (for two
# TP layouts of one model it is float noise). scipy gives the exact distributions; imported on use
# (scipy.stats costs ~1 s to import, and `validate` and the gate need none of it).

def mcnemar(worse: int, better: int) -> float:
    """McNemar's exact one-sided p-value: P(at least `worse` of the `worse + better` discordant
    pairs go against the layout | each goes either way with probability 1/2)."""
    if worse + better == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(worse, worse + better, 0.5, alternative="greater").pvalue)


def paired_shift_p(worse_side: list[float], baseline: list[float], tolerance: float = 0.0) -> float:
    """One-sided paired t-test (scipy.stats.ttest_rel) of H0 "the layout is worse by at most
    `tolerance`" against "worse by more"; `worse_side` is oriented so that larger is worse. Equal
    differences everywhere (no spread: the t statistic is undefined) decide by the shift alone."""
    diffs = [a - b for a, b in zip(worse_side, baseline)]
    if not diffs:
        return 1.0
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2 or max(diffs) - min(diffs) <= 1e-15 * max(1.0, abs(mean)):
        return 0.0 if mean > tolerance else 1.0
    from scipy.stats import ttest_rel

    return float(ttest_rel([a - tolerance for a in worse_side], baseline, alternative="greater").pvalue)


def paired_mde(sigma_d: float, n: int, alpha: float = 0.05, beta: float = 0.2) -> float:
    """Smallest true per-question shift a paired test over n questions detects with power 1-β
    (normal approximation; the tests themselves are exact)."""
    return (z(1 - alpha) + z(1 - beta)) * sigma_d / math.sqrt(n) if n > 0 else math.inf


def paired_required_n(sigma_d: float, effect: float, alpha: float = 0.05, beta: float = 0.2) -> int:
    """Questions a paired test needs to detect a true shift of `effect` (per-question difference
    spread σ_d) — beside required_n's unpaired count, which carries 2σ² of two independent sides."""
    if effect <= 0:
        raise ValueError("effect must be > 0")
    return max(1, math.ceil(((z(1 - alpha) + z(1 - beta)) * sigma_d / effect) ** 2))


def mcnemar_required_n(discordance: float, effect: float, alpha: float = 0.05, beta: float = 0.2) -> int:
    """Questions McNemar's test needs to detect a drop of `effect` in a proportion when a fraction
    `discordance` of questions flip between the layouts (Connor 1987). At least `effect` of them
    must flip for the drop to exist at all."""
    if effect <= 0:
        raise ValueError("effect must be > 0")
    psi = min(1.0, max(discordance, effect))
    root = z(1 - alpha) * math.sqrt(psi) + z(1 - beta) * math.sqrt(max(psi - effect ** 2, 0.0))
    return max(1, math.ceil(root ** 2 / effect ** 2))


def laplace(k: float, n: int) -> float:
    """(k + 1) / (n + 2): a rate estimated from k of n that claims neither 0 nor 1."""
    return (k + 1) / (n + 2)
