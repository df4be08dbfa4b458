"""Whether a check can tell anything, decided before a run: the smallest effect it detects at α
and β with n questions (what `validate` prints), the questions it needs, and whether its threshold
lies where no outcome can fail it (a check that cannot fail is refused at validate, not discovered
after a run). Pure statistics over a check and its reference (servematrix/stats.py does the
arithmetic); check/accuracy.py judges measured runs with the same rules.

In config, not in check: validating a matrix file needs these answers, and config imports no stage.
"""

from __future__ import annotations

import math

from servematrix import stats
from servematrix.config.references import BERNOULLI, Check, Reference
from servematrix.record import METRIC_DEFS, NO_FINGERPRINT


def reference_sigma(metric: str, ref: Reference) -> float:
    """Per-sample σ of a reference. A proportion uses Laplace's rule of succession,
    p = (k + 1) / (n + 2): a reference of 20/20 agreements (or 0/40 exact matches) does not claim
    zero variance, which would fail a run on a single near-tie flip."""
    if metric in BERNOULLI:
        return stats.bernoulli_sigma(stats.laplace(ref.mean * ref.n, ref.n))
    return ref.sigma


def uninformative(check: Check, ref: Reference, n: int) -> str | None:
    """Why this check, judged at n questions against `ref`, can never fail (or never pass), with
    what would make it informative; None when some outcome fails it and some passes it. The
    outcomes are the metric's range (k/n for a proportion: its ends are outcomes too), so a
    threshold at or beyond the end it guards is passed by every possible run."""
    m = METRIC_DEFS[check.metric]
    test = stats.OneSidedTest(reference=ref.mean, sigma=reference_sigma(check.metric, ref), n=n,
                              alpha=check.alpha, beta=check.beta, higher_is_better=m.higher_is_better)
    t, span = test.threshold, f"[{m.low:g}, {m.high:g}]"
    guarded = m.low if m.higher_is_better else m.high
    word = "floor" if m.higher_is_better else "ceiling"
    can_fail = t > m.low if m.higher_is_better else t < m.high
    can_pass = t <= m.high if m.higher_is_better else t >= m.low
    where = f"threshold {t:.4f} at n={n} against reference {ref.mean:.4f}"
    if not can_pass:
        return (f"{check.metric} can never pass: {where} lies beyond the {m.high if m.higher_is_better else m.low:g} "
                f"end of its range {span}; re-record the reference")
    if can_fail:
        return None
    if ref.mean == guarded:
        fix = (f"the reference sits at the {word} it guards, so no {'drop' if m.higher_is_better else 'rise'} "
               f"can be measured at any n: guard another metric (gsm8k.nll, gsm8k.agreement) or a model that "
               f"scores off the {word}")
    else:
        gap = abs(ref.mean - guarded)
        need = math.floor(2 * test.sigma ** 2 * stats.z(1 - check.alpha) ** 2 / gap ** 2) + 1
        fix = f"it needs n >= {need} questions, or another metric (gsm8k.nll), or another model"
    return (f"{check.metric} can never fail: {where} is at or past the {word} {guarded:g} of {span}, "
            f"so every outcome passes; {fix}")


def detectable(check: Check, ref: Reference | None, n: int) -> str:
    """What validate prints per check: the smallest effect it detects at α and β with n."""
    claim = f"claims {check.effect:g} at alpha={check.alpha:g}, beta={check.beta:g}"
    if ref is None:
        return f"n={n}: no reference yet ({claim})"
    test = stats.OneSidedTest(reference=ref.mean, sigma=reference_sigma(check.metric, ref), n=n,
                              alpha=check.alpha, beta=check.beta)
    unchecked = (f"; {NO_FINGERPRINT} in the reference {ref.source or ''}".rstrip()
                 + ": a run is compared with it without checking the protocol (record it again)"
                 if ref.protocol is None else "")
    return f"n={n}: MDE {test.mde:.4g} ({claim}) vs reference {ref.mean:.4g}{unchecked}"


def paired_tolerance(check: Check) -> float:
    """The shift a paired test of `check` treats as noise: the metric's, never more than a fifth of
    the effect the check claims (the test must still detect that)."""
    return min(METRIC_DEFS[check.metric].paired_tolerance, check.effect / 5)


def paired_mde(check: Check, sigma_d: float, n: int) -> float:
    """The smallest shift the paired test of `check` detects over n questions of spread σ_d."""
    return paired_tolerance(check) + stats.paired_mde(sigma_d, n, check.alpha, check.beta)


def needed_n(check: Check, ref: Reference | None) -> int:
    """Samples the check needs to detect its effect, from the reference's σ. Without a reference
    nothing is gated yet (the check reports "no reference"), so nothing is required."""
    if ref is None:
        return 1
    return stats.required_n(reference_sigma(check.metric, ref), check.effect, check.alpha, check.beta)
