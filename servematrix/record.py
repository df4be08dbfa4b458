"""The record of a run: every result type the stages produce and the reports, the gate and the
history read. Typed here, once, so summary.json has one schema; this module imports no stage, so a
reader of reports (`servematrix gate`) loads neither the launcher nor an HTTP client."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from servematrix import versions
from servematrix.record_gsm8k import PairedResult, Protocol, QuestionResult

# summary.json's layout: bumped when a reader of this code could no longer read a summary right.
# gate/diff/reference refuse any version not listed here rather than misread it.
SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)

# twin-incomplete: a sweep cell whose twin lacks a field or tensor vLLM read and the family's real
# checkpoints carry (sweep/incomplete.py): neither pass nor fail, it says nothing about vLLM
Verdict = Literal["pass", "fail", "xfail", "xpass", "error", "skipped", "twin-incomplete"]


# --- failures: what ended a stage ------------------------------------------------------------
Kind = Literal["exception", "oom", "timeout", "port-in-use", "signal", "exit", "interrupted", "check",
               "model", "tool", "baseline"]
# model: the checkpoint could not be resolved; tool: lm-eval itself failed while the server was fine;
# baseline: a layout's baseline never finished, so its comparison (parity, agreement) was not made
INFRA_KINDS = frozenset({"oom", "timeout", "port-in-use", "interrupted", "model", "tool", "baseline"})


class Failure(BaseModel):
    kind: Kind
    signature: str
    infra: bool
    phase: str = "load"  # load | smoke | gsm8k | run

    @classmethod
    def of(cls, kind: Kind, signature: str, phase: str = "load") -> "Failure":
        return cls(kind=kind, signature=signature, infra=kind in INFRA_KINDS, phase=phase)


# --- smoke (check.smoke) ---------------------------------------------------------------------
class Generation(BaseModel):
    """A greedy generation as token ids with each position's top-k logprobs (id -> logprob)."""

    text: str
    token_ids: list[int]
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None = None


class PromptResult(BaseModel):
    name: str
    endpoint: str  # completions | chat
    ok: bool
    text: str = ""
    problems: list[str] = Field(default_factory=list)
    generation: Generation | None = None


class ParityResult(BaseModel):
    ok: bool
    baseline: str
    details: list[str] = Field(default_factory=list)


class SmokeResult(BaseModel):
    ok: bool
    prompts: list[PromptResult]
    parity: ParityResult | None = None
    error: str | None = None  # transport failure (server died, timeout)


# --- gsm8k (check.gsm8k) and accuracy (check.accuracy) ------------------------------------------
class Gsm8kResult(BaseModel):
    strict: float
    strict_stderr: float
    flexible: float
    flexible_stderr: float
    n: int
    seconds: float
    samples_path: str | None = None
    nll_samples_path: str | None = None  # lm-eval's loglikelihood samples for the gold answers
    questions: list[QuestionResult] = Field(default_factory=list)  # empty in records before #13
    protocol: Protocol | None = None  # None in records before #13: "no fingerprint"


class MetricDef(BaseModel):
    """A metric's direction and range, said once: a check whose threshold lies outside [low, high]
    (a reference at the bound it guards) can never fail."""

    higher_is_better: bool
    low: float
    high: float
    proportion: bool = False  # a mean of per-question 0/1 outcomes (k of n)
    # a per-question shift a paired test treats as float noise (TP reduction order moves NLL ~1e-6
    # nats/token in fp32, ~1e-3 in bf16), far below the 0.05-0.25 the shipped checks claim
    paired_tolerance: float = 0.0


METRIC_DEFS: dict[str, MetricDef] = {
    "gsm8k.strict": MetricDef(higher_is_better=True, low=0.0, high=1.0, proportion=True),
    "gsm8k.flexible": MetricDef(higher_is_better=True, low=0.0, high=1.0, proportion=True),
    "gsm8k.nll": MetricDef(higher_is_better=False, low=0.0, high=float("inf"), paired_tolerance=0.01),
    "gsm8k.agreement": MetricDef(higher_is_better=True, low=0.0, high=1.0, proportion=True),
}
METRICS: dict[str, bool] = {k: m.higher_is_better for k, m in METRIC_DEFS.items()}  # derived


class MetricValue(BaseModel):
    mean: float
    sigma: float
    stderr: float
    n: int


# the note of a check judged against a reference when the run or the reference has no protocol
# fingerprint: compared as before, and reported (the check's line, the gate's flags, validate)
NO_FINGERPRINT = "no fingerprint"


class CheckResult(BaseModel):
    metric: str
    status: Literal["pass", "fail", "no-reference", "not-measured", "not-comparable"]
    measured: float | None = None
    n: int | None = None
    reference: float | None = None
    reference_n: int | None = None
    sigma: float | None = None
    threshold: float | None = None
    mde: float | None = None
    p_value: float | None = None
    wilson_low: float | None = None
    effect: float
    alpha: float
    beta: float
    needed_n: int | None = None  # unpaired: questions the reference test needs for `effect`
    paired: PairedResult | None = None  # set by compare on a layout with a baseline
    note: str | None = None  # not-comparable: what differs; "no fingerprint": either side has none

    @model_validator(mode="after")
    def _judged_on_numbers(self) -> "CheckResult":
        # check.accuracy.judge never passes a NaN (it is "not-measured"); a summary that says "pass"
        # about one was edited or written by something else, and the gate must not ship on it
        if self.status == "pass":
            bad = [f"{f} {getattr(self, f)}" for f in ("measured", "reference", "threshold")
                   if (f == "measured" and self.measured is None)
                   or (getattr(self, f) is not None and not math.isfinite(getattr(self, f)))]
            if bad:
                raise ValueError(f"a check that passed was judged on finite numbers, not on {', '.join(bad)}")
        if self.threshold is not None:  # what summary() prints beside it
            missing = [f for f in ("measured", "reference", "mde", "p_value", "n") if getattr(self, f) is None]
            if missing or self.metric not in METRICS:
                raise ValueError(f"a judged check needs a known metric and {', '.join(missing) or 'its numbers'} "
                                 f"(metric {self.metric!r})")
        return self

    def summary(self) -> str:
        if self.status in {"no-reference", "not-measured", "not-comparable"} or self.threshold is None:
            text = f"{self.metric}: {self.status}" + (f" ({self.note})" if self.note else "")
        else:
            op = ">=" if METRICS[self.metric] else "<="
            text = (f"{self.metric}: {self.measured:.4f} (n={self.n}) vs ref {self.reference:.4f}; need {op} "
                    f"{self.threshold:.4f}; MDE {self.mde:.4f}; p={self.p_value:.3g}"
                    + (f" ({self.note})" if self.note else ""))
            text += f" → {self.status}" if self.paired is None else ""
        if self.paired is not None:
            text += f"; {self.paired.summary()} ⇒ {self.status}"
        return text


# --- load check (serve.loadcheck) ----------------------------------------------------------------
class RankResult(BaseModel):
    rank: int
    ok: bool
    pid: int | None = None
    steps: list[str] = Field(default_factory=list)  # what this rank did: construct, load
    model: str | None = None
    parameters: int | None = None
    numel: int | None = None
    error: str | None = None
    seconds: float | None = None


LoadParity = ParityResult  # the same judgement over parameter digests instead of greedy tokens


class LoadCheckResult(BaseModel):
    """What vLLM's loader did on each rank. `digests`: parameter name → dtype, shape and content
    hash, over all ranks (each PP rank holds its own layers; TP ranks hold shards)."""

    ok: bool
    ranks: list[RankResult] = Field(default_factory=list)
    seconds: float
    digests: dict[str, str] = Field(default_factory=dict)
    parity: LoadParity | None = None  # set by the compare stage
    not_served: str | None = None  # why the entry was load-checked instead of served (its release, on this host)


class StageFailed(Exception):
    """The one way a stage says it could not produce its result: the failure that decides the
    verdict, and the typed results it did produce (`recorded`: record fields, e.g. load=...)."""

    def __init__(self, failure: Failure, **recorded):
        super().__init__(failure.signature)
        self.failure, self.recorded = failure, recorded


# --- one entry, one run ----------------------------------------------------------------------------
class Expected(BaseModel):
    """The entry's expectation as recorded (config.matrix.Expectation validated it when read)."""

    expect: Literal["pass", "xfail"] = "pass"
    reason: str | None = None
    bug: str | None = None
    signature: str | None = None
    strict: bool = True
    until: str | None = None  # a waiver's end: ISO date or release (report/waivers.py)

    @field_validator("until")
    @classmethod
    def _until(cls, v: str | None) -> str | None:
        # a summary another tool edited may say anything here: an end that cannot be read is
        # refused when the summary is read (exit 2), never judged "expired" (exit 1)
        if v is not None:
            versions.parse_until(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_config(cls, value):
        # an entry's config.matrix.Expectation (validated when the matrix was read), as JSON data
        return value.model_dump(mode="json") if isinstance(value, BaseModel) and not isinstance(value, cls) else value


class FixRecord(BaseModel):
    name: str
    status: Literal["applied", "already-fixed", "not-applicable", "failed"]
    pid: int
    detail: str | None = None


class LoadResult(BaseModel):
    ok: bool
    seconds: float | None = None
    error: Failure | None = None


class EntryOutcome(BaseModel):
    """What running one entry produced, before its verdict: the pipeline's result (what a Ray task
    sends back), judged against the baseline's record by check.compare, then given its verdict once
    by check.verdict.judge."""

    id: str
    scenario: str
    model: str
    tp: int
    pp: int
    quant: str
    vllm: str
    device: str
    tags: list[str] = Field(default_factory=list)
    expect: Expected
    enabled_fixes: list[str] = Field(default_factory=list)  # fix modules the matrix entry enables
    fixes: list[FixRecord] = Field(default_factory=list)  # what each vLLM process said they did
    vllm_version: str | None = None  # the exact versions this scenario's server ran on
    torch_version: str | None = None
    load: LoadResult | None = None
    load_check: LoadCheckResult | None = None  # set when the entry checked loading instead of serving
    smoke: SmokeResult | None = None
    embedding: EmbeddingResult | None = None  # the smoke of a pooling model (defined at the end)
    gsm8k: Gsm8kResult | None = None
    gsm8k_error: str | None = None
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    accuracy: list[CheckResult] = Field(default_factory=list)
    failure: Failure | None = None  # the failure that decides the verdict, if any
    server_command: str | None = None
    node: str | None = None  # the host the server ran on (a Ray cluster spreads them)
    started_at: str
    seconds: float
    attempts: int = 1
    skipped: str | None = None  # why no slot or host could run it (then nothing else is set)
    # a sweep cell whose twin lacks a field or tensor vLLM read and the family's real checkpoints carry
    # (sweep/incomplete.py): its verdict is twin-incomplete, whatever the failure, which the note keeps
    incomplete: str | None = None
    # what the run says of the entry beside its verdict's own note (a sweep cell's depth, head, twin)
    remarks: list[str] = Field(default_factory=list)


class ScenarioRecord(EntryOutcome):
    """An entry's outcome with its verdict: one row of summary.json."""

    verdict: Verdict
    note: str | None = None  # why xfail/xpass/error/skipped, then the remarks
    # said by verdict and note instead
    skipped: str | None = Field(default=None, exclude=True)
    incomplete: str | None = Field(default=None, exclude=True)
    remarks: list[str] = Field(default_factory=list, exclude=True)


class RunSummary(BaseModel):
    schema_version: int = SCHEMA_VERSION
    matrix: str
    run_dir: str = Field(min_length=1)  # where the run was written: reference record names it as the source
    host: str
    vllm_version: str | None
    torch_version: str | None
    servematrix_version: str
    started_at: str
    ended_at: str | None = None
    status: Literal["running", "complete", "interrupted", "error"] = "running"
    selected: list[str] = Field(default_factory=list)  # ids this run was asked to run
    scenarios: list[ScenarioRecord] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    exit_code: int | None = None


# --- embedding smoke (check.embedding) ----------------------------------------------------------
class EmbeddingVector(BaseModel):
    name: str
    dimension: int
    norm: float
    vector: list[float]  # kept whole: TP parity compares it with the baseline's


class EmbeddingResult(BaseModel):
    """/v1/embeddings smoke: each input's vector, the cosines the scenario's expectations compare
    ("a|b" -> cosine), what they did not meet, and parity with the baseline (set by compare)."""

    ok: bool
    vectors: list[EmbeddingVector] = Field(default_factory=list)
    cosines: dict[str, float] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)
    parity: ParityResult | None = None
    parity_cosines: dict[str, float] = Field(default_factory=dict)  # input -> cosine with the baseline's
    error: str | None = None  # transport failure (server died, timeout)


# EntryOutcome names EmbeddingResult before it is defined (it is appended here, after the types
# others edit); resolve the forward reference in it and in the models built on it
for _model in (EntryOutcome, ScenarioRecord, RunSummary):
    _model.model_rebuild()
