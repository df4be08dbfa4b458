"""Accuracy checks: measured metrics against references, judged by stats.OneSidedTest.

References are data (`references/*.yaml`), keyed by scenario, quant, TP, PP, device and a vLLM
version range, each with the mean, per-sample σ and n it was measured with. A scenario says which
metrics it guards and the effect each must detect; a check with no reference is reported as
"no reference", never as a pass.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from servematrix import stats
from servematrix.config.power import needed_n, paired_mde, paired_tolerance, reference_sigma, uninformative
from servematrix.config.references import BERNOULLI, Check, RefKey, Reference
from servematrix.errors import ConfigError
from servematrix.record import (METRICS, NO_FINGERPRINT, CheckResult, MetricValue, PairedResult,
                                Protocol, QuestionResult, ScenarioRecord)
from servematrix.record_gsm8k import protocol_note


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


def judge(check: Check, measured: MetricValue | None, ref: Reference | None,
          protocol: Protocol | None = None) -> CheckResult:
    """The one-sided test of `measured` against `ref`; a reference recorded under another protocol
    is not compared at all ("not-comparable", saying what differs)."""
    base = dict(metric=check.metric, effect=check.effect, alpha=check.alpha, beta=check.beta)
    if measured is None or math.isnan(measured.mean):
        return CheckResult(status="not-measured", **base)
    if ref is None:
        return CheckResult(status="no-reference", measured=measured.mean, n=measured.n, **base)
    differs = protocol_note(protocol, ref.protocol, f"reference {ref.source or ''}".strip())
    if differs is not None:
        return CheckResult(status="not-comparable", measured=measured.mean, n=measured.n, reference=ref.mean,
                           reference_n=ref.n, note=differs, **base)
    sigma = reference_sigma(check.metric, ref)
    test = stats.OneSidedTest(reference=ref.mean, sigma=sigma, n=measured.n, alpha=check.alpha,
                              beta=check.beta, higher_is_better=METRICS[check.metric])
    wl = stats.wilson(measured.mean * measured.n, measured.n, check.alpha)[0] if check.metric in BERNOULLI else None
    return CheckResult(status="pass" if test.passed(measured.mean) else "fail", measured=measured.mean,
                       n=measured.n, reference=ref.mean, reference_n=ref.n, sigma=sigma,
                       threshold=test.threshold, mde=test.mde, p_value=test.p_value(measured.mean),
                       wilson_low=wl, needed_n=needed_n(check, ref),
                       note=unfingerprinted(protocol, ref), **base)


def unfingerprinted(protocol: Protocol | None, ref: Reference) -> str | None:
    """The note of a comparison made without both fingerprints, saying which side lacks one (the
    rule: a reference without one is compared as before but never silently — the note is in the
    check's line, and the gate and validate report it); None when both have one."""
    if protocol is not None and ref.protocol is not None:
        return None
    side = ("the run and the reference" if protocol is None and ref.protocol is None
            else "this run" if protocol is None else f"the reference {ref.source or ''}".rstrip())
    return f"{NO_FINGERPRINT} in {side}: protocols not checked"


# --- paired: a layout against its baseline's per-question outcomes (check.compare) ----------------
def paired(check: Check, mine: list[QuestionResult], base: list[QuestionResult], baseline: str) -> PairedResult | None:
    """The paired test of `check`'s metric over the questions both layouts answered: McNemar on
    exact match (the agreement check: on flexible-extract correctness, i.e. whether the answers
    that changed got worse), a one-sided paired t-test on per-question NLL. None where nothing can
    be paired (no per-question data; a baseline that answered none right cannot lose any)."""
    by_doc = {q.doc_id: q for q in base}
    pairs = [(q, by_doc[q.doc_id]) for q in mine if q.doc_id in by_doc]
    if not pairs:
        return None
    if check.metric == "gsm8k.nll":
        pairs = [(a, b) for a, b in pairs if a.nll is not None and b.nll is not None]
        return _paired_nll(check, [a.nll for a, _ in pairs], [b.nll for _, b in pairs], baseline) if pairs else None
    field = "strict" if check.metric == "gsm8k.strict" else "flexible"
    if not any(getattr(b, field) for _, b in pairs):
        return None
    worse = sum(1 for a, b in pairs if getattr(b, field) and not getattr(a, field))
    better = sum(1 for a, b in pairs if getattr(a, field) and not getattr(b, field))
    n = len(pairs)
    p = stats.mcnemar(worse, better)
    # the per-question spread of a ±1/0 difference is √(flip rate); by Laplace's rule, so that a run
    # with no flip does not claim flips are impossible
    psi = stats.laplace(worse + better, n)
    return PairedResult(test="mcnemar", baseline=baseline, n=n, worse=worse, better=better,
                        shift=(worse - better) / n, sigma=math.sqrt(psi), p_value=p,
                        mde=paired_mde(check, math.sqrt(psi), n),
                        needed_n=stats.mcnemar_required_n(psi, check.effect, check.alpha, check.beta),
                        status="fail" if p < check.alpha else "pass")


def _paired_nll(check: Check, mine: list[float], base: list[float], baseline: str) -> PairedResult:
    tol = paired_tolerance(check)
    shift, sd, _ = stats.mean_sigma_stderr([a - b for a, b in zip(mine, base)])
    sd = 0.0 if math.isnan(sd) else sd
    p = stats.paired_shift_p(mine, base, tol)
    return PairedResult(test="ttest_rel", baseline=baseline, n=len(mine), shift=shift, sigma=sd, tolerance=tol,
                        p_value=p, mde=paired_mde(check, sd, len(mine)),
                        needed_n=stats.paired_required_n(sd, check.effect - tol, check.alpha, check.beta),
                        status="fail" if p < check.alpha else "pass")


def with_paired(result: CheckResult, pair: PairedResult | None) -> CheckResult:
    """A check's result with its paired test: a paired failure fails the check (the layout is worse
    than its baseline on the same questions), whatever the reference said."""
    if pair is None:
        return result
    return result.model_copy(update={"paired": pair, "status": "fail" if pair.status == "fail" else result.status})


def reference_from(metric: str, value: MetricValue, key: RefKey, source: str,
                   record: ScenarioRecord | None = None) -> Reference:
    """A reference from a trusted run's metric, with the record's protocol fingerprint and paired
    spread. Refused (StateError, nothing written) when a check the record ran on this metric could
    never fail against it: a reference that makes its own check uninformative is no reference."""
    checks = {c.metric: c for c in record.accuracy} if record is not None else {}
    pair = checks[metric].paired if metric in checks else None
    ref = Reference(key=key, metric=metric, mean=value.mean, sigma=value.sigma, n=value.n,
                    stderr=value.stderr, source=source,
                    recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    protocol=record.gsm8k.protocol if record is not None and record.gsm8k else None,
                    paired_sigma=pair.sigma if pair is not None else None)
    if metric in checks:
        c = checks[metric]
        why = uninformative(Check(metric=metric, effect=c.effect, alpha=c.alpha, beta=c.beta), ref, value.n)
        if why is not None:  # named by the scenario file that declares the check (the run's own paths may be gone)
            raise ConfigError(f"scenarios/{record.scenario}.yaml", None, f"accuracy.checks ({metric})",
                              f"{record.id} of run {source}: {why}; nothing recorded (drop or replace the check, "
                              "then record again)")
    return ref
