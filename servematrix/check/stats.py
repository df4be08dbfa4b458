"""All of servematrix's statistics, in one place.

An accuracy check is a one-sided test of the measured mean against a reference mean, in the
manner of TensorRT-LLM's accuracy_core: both means come from n samples with per-sample standard
deviation σ, so their difference has standard error sqrt(2σ²/n). With significance α and power
1-β that gives a threshold, a minimum detectable effect and a p-value; the Wilson interval is
reported beside it for proportions.
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
