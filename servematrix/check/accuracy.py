"""Accuracy checks: measured metrics against references, judged by stats.OneSidedTest.

References are data (`references/*.yaml`), keyed by scenario, quant, TP, PP, device and a vLLM
version range, each with the mean, per-sample σ and n it was measured with. A scenario says which
metrics it guards and the effect each must detect; a check with no reference is reported as
"no reference", never as a pass.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from servematrix.check import stats
from servematrix.record import METRICS, CheckResult, MetricValue
from servematrix.config.yamlio import field_error, load_yaml, validate

BERNOULLI = {"gsm8k.strict", "gsm8k.flexible", "gsm8k.agreement"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The smallest effect a check may claim: the n it needs grows as 1/effect², and below this it is
# beyond any test set (a 1e-4 change of a proportion needs ~10^8 questions).
MIN_EFFECT = 1e-4
MAX_NLL_EFFECT = 100.0  # nats per token: far beyond any real change of a model's NLL


class Check(_Strict):
    """One guarded metric: detect a true change of `effect` at significance α with power 1-β."""

    metric: str
    effect: float = Field(strict=True, ge=MIN_EFFECT, le=MAX_NLL_EFFECT, allow_inf_nan=False)
    alpha: float = Field(0.05, strict=True, gt=0, lt=0.5, allow_inf_nan=False)
    beta: float = Field(0.2, strict=True, gt=0, lt=0.5, allow_inf_nan=False)

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r} (known: {', '.join(METRICS)})")
        return v

    @model_validator(mode="after")
    def _proportion_effect(self) -> "Check":
        if self.metric in BERNOULLI and self.effect >= 1:  # a proportion cannot move by 1 or more
            raise field_error(("effect",), f"{self.metric} is a proportion: effect must be below 1 (got {self.effect})")
        return self


class RefKey(_Strict):
    scenario: str
    quant: str
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    vllm: str = ""  # PEP 440 specifier on the vLLM version, "" = any

    @field_validator("vllm")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            SpecifierSet(v)
        except InvalidSpecifier as exc:
            raise ValueError(f"not a version range: {v!r}") from exc
        return v

    def matches(self, scenario: str, quant: str, tp: int, pp: int, device: str, vllm: str | None) -> bool:
        if (self.scenario, self.quant, self.tp, self.pp, self.device) != (scenario, quant, tp, pp, device):
            return False
        if not self.vllm or vllm is None:
            return True
        try:
            return Version(vllm.split("+")[0]) in SpecifierSet(self.vllm)
        except InvalidVersion:
            return False


class Reference(_Strict):
    key: RefKey
    metric: str
    # finite and bounded: a reference is data someone may edit, and a sigma of 1e200 would overflow
    # the power calculation at validate time instead of being refused at its line
    mean: float = Field(allow_inf_nan=False, ge=-1e6, le=1e6)
    sigma: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    n: int = Field(ge=1, le=10_000_000)
    stderr: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    source: str | None = None  # the run it was recorded from
    recorded_at: str | None = None


class ReferenceFile(_Strict):
    references: list[Reference] = Field(default_factory=list)


class References:
    def __init__(self, refs: list[Reference], paths: list[Path]):
        self.refs, self.paths = refs, paths

    @classmethod
    def load(cls, directory: Path) -> "References":
        refs, paths = [], sorted(Path(directory).glob("*.yaml")) if Path(directory).is_dir() else []
        for p in paths:
            located = load_yaml(p)
            if located.data is not None:
                refs += validate(located, ReferenceFile).references
        return cls(refs, paths)

    def find(self, metric: str, scenario: str, quant: str, tp: int, pp: int, device: str,
             vllm: str | None) -> Reference | None:
        hits = [r for r in self.refs if r.metric == metric and r.key.matches(scenario, quant, tp, pp, device, vllm)]
        return hits[-1] if hits else None  # the latest recorded wins


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


def reference_from(metric: str, value: MetricValue, key: RefKey, source: str) -> Reference:
    return Reference(key=key, metric=metric, mean=value.mean, sigma=value.sigma, n=value.n,
                     stderr=value.stderr, source=source,
                     recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def dump_references(refs: list[Reference]) -> str:
    data = {"references": [r.model_dump(exclude_none=True) for r in refs]}
    return ("# Accuracy references, written by `servematrix reference record RUN_DIR` from a trusted run.\n"
            + yaml.safe_dump(data, sort_keys=False))
