"""The record of a run: what the runner produces and the report stage (and later the gate) reads.
Typed here, once, so summary.json has one schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from servematrix.check.accuracy import CheckResult, MetricValue
from servematrix.serve.failure import Failure
from servematrix.check.gsm8k import Gsm8kResult
from servematrix.serve.loadcheck import LoadCheckResult
from servematrix.config.matrix import Entry, Expectation
from servematrix.check.smoke import SmokeResult

# summary.json's layout: bumped when a reader of this code could no longer read a summary right.
# gate/diff/reference refuse any version not listed here rather than misread it.
SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)

Verdict = Literal["pass", "fail", "xfail", "xpass", "error", "skipped"]


class FixRecord(BaseModel):
    name: str
    status: Literal["applied", "already-fixed", "not-applicable", "failed"]
    pid: int
    detail: str | None = None


class LoadResult(BaseModel):
    ok: bool
    seconds: float | None = None
    error: Failure | None = None


class ScenarioRecord(BaseModel):
    id: str
    scenario: str
    model: str
    tp: int
    pp: int
    quant: str
    vllm: str
    device: str
    tags: list[str] = Field(default_factory=list)
    expect: Expectation
    enabled_fixes: list[str] = Field(default_factory=list)  # fix modules the matrix entry enables
    fixes: list[FixRecord] = Field(default_factory=list)  # what each vLLM process said they did
    vllm_version: str | None = None  # the exact versions this scenario's server ran on
    torch_version: str | None = None
    load: LoadResult | None = None
    load_check: LoadCheckResult | None = None  # set when the entry checked loading instead of serving
    smoke: SmokeResult | None = None
    gsm8k: Gsm8kResult | None = None
    gsm8k_error: str | None = None
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    accuracy: list[CheckResult] = Field(default_factory=list)
    failure: Failure | None = None  # the failure that decided the verdict, if any
    verdict: Verdict
    note: str | None = None  # why xfail/xpass/error
    server_command: str | None = None
    node: str | None = None  # the host the server ran on (a Ray cluster spreads them)
    started_at: str
    seconds: float
    attempts: int = 1

    @classmethod
    def for_entry(cls, e: Entry, **kw) -> "ScenarioRecord":
        return cls(id=e.id, scenario=e.scenario, tp=e.tp, pp=e.pp, quant=e.quant, vllm=e.vllm,
                   device=e.device, tags=list(e.tags), expect=e.expectation, enabled_fixes=list(e.fixes), **kw)


class RunSummary(BaseModel):
    schema_version: int = SCHEMA_VERSION
    matrix: str
    run_dir: str
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
