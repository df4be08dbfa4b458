"""Gate: turn a run's reports (and optionally a baseline run's) into a release decision.

0 ship · 1 regression (a scenario missed its expectation, a newly failing scenario, load or
accuracy pass rate under its minimum) · 2 cannot judge (infrastructure errors, an incomplete run,
scenarios missing against the baseline). A definite regression outranks "cannot judge".
Infrastructure failures are never counted as regressions; xfail scenarios that now pass are
flagged so the waiver can be dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from servematrix.results import RunSummary, ScenarioRecord
from servematrix.verdict import EXIT_INFRA, EXIT_OK, EXIT_REGRESSION


class Row(BaseModel):
    id: str
    verdict: str
    load: str
    accuracy: str
    note: str = ""


class Decision(BaseModel):
    exit_code: int
    rows: list[Row]
    regressions: list[str] = Field(default_factory=list)
    cannot_judge: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)
    load_rate: float | None = None
    accuracy_rate: float | None = None

    @property
    def word(self) -> str:
        return {EXIT_OK: "SHIP", EXIT_REGRESSION: "REGRESSION", EXIT_INFRA: "CANNOT JUDGE"}[self.exit_code]


def load_summary(run_dir: Path) -> RunSummary:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (not a servematrix run directory?)")
    return RunSummary.model_validate(json.loads(path.read_text()))


def _load_cell(r: ScenarioRecord) -> str:
    if r.verdict == "error":
        return f"error ({r.failure.kind})" if r.failure else "error"
    if r.load is None:
        return "-"
    return "ok" if r.load.ok else "FAIL"


def _accuracy_cell(r: ScenarioRecord) -> str:
    if not r.accuracy:
        return "-"
    return ", ".join(f"{c.metric.split('.', 1)[-1]} {c.status}" for c in r.accuracy)


def decide(run: RunSummary, baseline: RunSummary | None = None, min_load_rate: float = 1.0,
           min_accuracy_rate: float = 1.0) -> Decision:
    by_id = {r.id: r for r in run.scenarios}
    rows, regressions, cannot, flags = [], [], [], []
    for r in run.scenarios:
        note = r.note or (r.failure.signature if r.failure else "")
        rows.append(Row(id=r.id, verdict=r.verdict, load=_load_cell(r), accuracy=_accuracy_cell(r), note=note[:160]))
        if r.verdict == "fail":
            regressions.append(f"{r.id}: {r.failure.signature if r.failure else 'failed'}")
        elif r.verdict == "error":
            cannot.append(f"{r.id}: infrastructure: {r.failure.signature if r.failure else '?'}")
        elif r.verdict == "xpass":
            flags.append(f"{r.id}: fixed upstream — drop the waiver ({r.expect.bug})")
    if run.status != "complete":
        cannot.append(f"run is {run.status}, not complete")
    for missing in [i for i in run.selected if i not in by_id]:
        cannot.append(f"{missing}: selected but never ran")
    if baseline is not None:
        for b in baseline.scenarios:
            now = by_id.get(b.id)
            if now is None:
                cannot.append(f"{b.id}: in the baseline run, missing from this run")
            elif b.verdict == "pass" and now.verdict == "fail":
                regressions.append(f"{b.id}: newly failing (passed in the baseline)")
            elif b.verdict == "fail" and now.verdict == "pass":
                flags.append(f"{b.id}: newly passing")
    # rates over what could be judged: expected-to-pass scenarios without infrastructure errors
    judged = [r for r in run.scenarios if r.expect.expect == "pass" and r.verdict != "error"]
    load_rate = sum(1 for r in judged if r.load and r.load.ok) / len(judged) if judged else None
    checks = [c for r in judged for c in r.accuracy if c.status in {"pass", "fail"}]
    acc_rate = sum(1 for c in checks if c.status == "pass") / len(checks) if checks else None
    if load_rate is not None and load_rate < min_load_rate:
        regressions.append(f"load success rate {load_rate:.2%} < minimum {min_load_rate:.2%}")
    if acc_rate is not None and acc_rate < min_accuracy_rate:
        regressions.append(f"accuracy pass rate {acc_rate:.2%} < minimum {min_accuracy_rate:.2%}")
    code = EXIT_REGRESSION if regressions else EXIT_INFRA if cannot else EXIT_OK
    return Decision(exit_code=code, rows=rows, regressions=regressions, cannot_judge=cannot, flags=flags,
                    load_rate=load_rate, accuracy_rate=acc_rate)


def render(d: Decision, run: RunSummary) -> str:
    w_id = max([len(r.id) for r in d.rows] + [8])
    lines = [f"{'scenario':<{w_id}}  {'verdict':<8}  {'load':<14}  accuracy / note",
             f"{'-' * w_id}  {'-' * 8}  {'-' * 14}  {'-' * 30}"]
    for r in d.rows:
        extra = r.accuracy if r.accuracy != "-" else ""
        extra = "; ".join(x for x in (extra, r.note) if x)
        lines.append(f"{r.id:<{w_id}}  {r.verdict:<8}  {r.load:<14}  {extra}")
    for rec in run.scenarios:
        for c in rec.accuracy:
            lines.append(f"  {rec.id}: {c.summary()}")
    rate = lambda x: "n/a" if x is None else f"{x:.2%}"  # noqa: E731
    lines += ["", f"load success rate {rate(d.load_rate)} · accuracy pass rate {rate(d.accuracy_rate)}"]
    for title, items in (("regressions", d.regressions), ("cannot judge", d.cannot_judge), ("flags", d.flags)):
        if items:
            lines += ["", f"{title}:"] + [f"  - {i}" for i in items]
    lines += ["", f"verdict: {d.word} (exit {d.exit_code})"]
    return "\n".join(lines)
