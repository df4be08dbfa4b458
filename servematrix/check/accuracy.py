"""Accuracy checks: measured metrics against references, judged by stats.OneSidedTest.

References are data (`references/*.yaml`), keyed by scenario, quant, TP, PP, device and a vLLM
version range, each with the mean, per-sample σ and n it was measured with. A scenario says which
metrics it guards and the effect each must detect; a check with no reference is reported as
"no reference", never as a pass.
"""

from __future__ import annotations

import math

from servematrix.check import stats
from servematrix.config.references import BERNOULLI, Check, Reference
from servematrix.record import METRICS, CheckResult, MetricValue

def gsm8k_metrics(strict: float, flexible: float, n: int) -> dict[str, MetricValue]:
    """Exact-match proportions as metrics (per-sample σ of a Bernoulli mean)."""
    out = {}
    for name, p in (("gsm8k.strict", strict), ("gsm8k.flexible", flexible)):
        sigma = stats.bernoulli_sigma(p)
        out[name] = MetricValue(mean=p, sigma=sigma, stderr=sigma / math.sqrt(n) if n else math.nan, n=n)
    return out


def value_metric(values: list[float]) -> MetricValue:
    mean, sigma, stderr = stats.mean_sigma_stderr(values)
    return MetricValue(mean=mean, sigma=sigma, stderr=stderr, n=len(values))


def agreement_metric(answers: dict[int, str], baseline: dict[int, str]) -> MetricValue | None:
    """Fraction of questions (answered by both) whose extracted greedy answer equals the baseline's."""
    common = sorted(set(answers) & set(baseline))
    if not common:
        return None
    return value_metric([1.0 if answers[d] == baseline[d] else 0.0 for d in common])


def reference_sigma(metric: str, ref: Reference) -> float:
    """Per-sample σ of a reference. A proportion uses Laplace's rule of succession,
    p = (k + 1) / (n + 2): a reference of 20/20 agreements (or 0/40 exact matches) does not claim
    zero variance, which would fail a run on a single near-tie flip."""
    if metric in BERNOULLI:
        return stats.bernoulli_sigma((ref.mean * ref.n + 1) / (ref.n + 2))
    return ref.sigma


def judge(check: Check, measured: MetricValue | None, ref: Reference | None) -> CheckResult:
    base = dict(metric=check.metric, effect=check.effect, alpha=check.alpha, beta=check.beta)
    if measured is None or math.isnan(measured.mean):
        return CheckResult(status="not-measured", **base)
    if ref is None:
        return CheckResult(status="no-reference", measured=measured.mean, n=measured.n, **base)
    sigma = reference_sigma(check.metric, ref)
    test = stats.OneSidedTest(reference=ref.mean, sigma=sigma, n=measured.n, alpha=check.alpha,
                              beta=check.beta, higher_is_better=METRICS[check.metric])
    wl = stats.wilson(measured.mean * measured.n, measured.n, check.alpha)[0] if check.metric in BERNOULLI else None
    return CheckResult(status="pass" if test.passed(measured.mean) else "fail", measured=measured.mean,
                       n=measured.n, reference=ref.mean, reference_n=ref.n, sigma=sigma,
                       threshold=test.threshold, mde=test.mde, p_value=test.p_value(measured.mean),
                       wilson_low=wl, **base)


def needed_n(check: Check, ref: Reference | None) -> int:
    """Samples the check needs to detect its effect, from the reference's σ. Without a reference
    nothing is gated yet (the check reports "no reference"), so nothing is required."""
    if ref is None:
        return 1
    return stats.required_n(reference_sigma(check.metric, ref), check.effect, check.alpha, check.beta)
