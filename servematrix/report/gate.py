"""Gate: turn a run's reports (and optionally a baseline run's) into a release decision.

0 ship · 1 regression (a scenario missed its expectation, a newly failing scenario, load or
accuracy pass rate under its minimum) · 2 cannot judge (infrastructure errors, an incomplete run,
scenarios missing against the baseline). A definite regression outranks "cannot judge".
Infrastructure failures are never counted as regressions; xfail scenarios that now pass are
flagged so the waiver can be dropped.

With the history (`gate --history N`) a scenario's verdict is read through hysteresis
(history.standing): a miss counts only once it has missed in 2 distinct runs in a row, and a
broken scenario stays a regression until 3 clean runs; an error never flips it. Stale or expired
waivers (report.waivers) are flagged, and fail the gate when asked (`--fail-on-stale-waivers`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from servematrix.errors import StateError
from servematrix.redact import column_width, terminal
from servematrix.report import jsonio
from servematrix.report.comparison import compare_runs
from servematrix.report.history import Standing, standing
from servematrix.record import KNOWN_SCHEMA_VERSIONS, NO_FINGERPRINT, RunSummary, ScenarioRecord
from servematrix.check.verdict import EXIT_INFRA, EXIT_OK, EXIT_REGRESSION, unjudged


LINE = 2000  # characters of one printed note or list item (a signature, a reason)


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
    standings: list[str] = Field(default_factory=list)  # per scenario, with --history
    waivers: list[str] = Field(default_factory=list)  # every waiver's state

    @property
    def word(self) -> str:
        return {EXIT_OK: "SHIP", EXIT_REGRESSION: "REGRESSION", EXIT_INFRA: "CANNOT JUDGE"}[self.exit_code]


def load_summary(run_dir: Path) -> RunSummary:
    """The run in `run_dir`, or a StateError naming what is wrong with it: no such directory, no
    summary.json, a truncated or foreign file, a schema this code does not know."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    try:  # is_dir/is_file swallow "no such file" but raise "permission denied": said as the rest
        if not run_dir.is_dir():
            what = "not a directory" if run_dir.exists() else "no such directory"
            raise StateError(run_dir, f"{what}; expected a run directory holding summary.json")
        if not path.is_file():
            raise StateError(path, "missing or not a file (not a servematrix run directory?)")
        data = jsonio.loads(jsonio.read_text(path))
    except jsonio.JSONRefused as exc:
        raise StateError(path, f"{exc}; not a servematrix summary") from None
    except OSError as exc:
        raise StateError(path, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise StateError(path, f"not text (byte {exc.start}); not a servematrix summary") from exc
    except json.JSONDecodeError as exc:  # a run killed mid-write cannot do this (atomic writes); a copy can
        raise StateError(path, f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                               "truncated or damaged") from exc
    return _summary(path, data)


def _summary(path: Path, data) -> RunSummary:
    known = ", ".join(map(str, KNOWN_SCHEMA_VERSIONS))
    if not isinstance(data, dict) or "schema_version" not in data:
        raise StateError(path, "not a servematrix summary (a JSON object with schema_version, matrix, "
                               f"scenarios, ... is expected; schema versions known: {known})")
    version = data["schema_version"]
    if type(version) is not int or version not in KNOWN_SCHEMA_VERSIONS:
        raise StateError(path, f"schema_version {version!r} is not one this servematrix reads (known: {known}); "
                               "written by another servematrix version?")
    try:
        return RunSummary.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise StateError(path, f"not a valid servematrix summary: {where or 'top level'}: {first['msg']}{more}") \
            from exc


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


def standings(run: RunSummary, results: dict[str, list[dict]], last: int) -> dict[str, Standing]:
    """Each scenario's standing over its last `last` runs up to this one (the history's rows of
    runs started no later than it, this run's own verdict last, counted once). A scenario with no
    judged run before this one is judged on this run alone (absent here): no history, no grace."""
    out = {}
    for r in run.scenarios:
        before = [x["verdict"] for x in results.get(r.id, [])
                  if x["run_dir"] != run.run_dir and str(x["started_at"]) <= run.started_at]
        window = (before + [r.verdict])[-last:]
        if standing(window[:-1]).runs:
            out[r.id] = standing(window)
    return out


def decide(run: RunSummary, baseline: RunSummary | None = None, min_load_rate: float = 1.0,
           min_accuracy_rate: float = 1.0, history: dict[str, Standing] | None = None,
           waivers: list | None = None, fail_on_stale_waivers: bool = False) -> Decision:
    """`history`: standings (above) to read verdicts through; `waivers`: report.waivers states."""
    by_id = {r.id: r for r in run.scenarios}
    rows, regressions, cannot, flags = [], [], [], []
    history = history or {}
    # misses not (yet) counted: the scenario has not missed in BROKEN_AFTER runs in a row
    held = {i for i, st in history.items() if by_id[i].verdict in {"fail", "xpass"} and st.state == "ok"}
    for r in run.scenarios:
        note = r.note or (r.failure.signature if r.failure else "")
        rows.append(Row(id=r.id, verdict=r.verdict, load=_load_cell(r), accuracy=_accuracy_cell(r), note=note[:160]))
        if r.id in held:
            flags.append(f"{r.id}: {r.verdict}, not counted yet — broken only after missing in 2 distinct runs in a "
                         f"row ({history[r.id].describe()})")
        elif r.id in history and history[r.id].state == "broken" and r.verdict in {"pass", "xfail"}:
            regressions.append(f"{r.id}: still broken — {history[r.id].streak} of 3 clean runs in a row since it "
                               f"broke ({history[r.id].describe()})")
        elif r.verdict == "fail":
            regressions.append(f"{r.id}: {r.failure.signature if r.failure else 'failed'}")
        elif r.verdict == "error":
            cannot.append(f"{r.id}: infrastructure: {r.failure.signature if r.failure else '?'}")
        elif r.verdict == "xpass":
            flags.append(f"{r.id}: fixed upstream — drop the waiver ({r.expect.bug})")
        # a reference measured under another protocol was not compared: nothing was judged there
        cannot += [f"{r.id}: {c.metric} not comparable with its reference ({c.note})"
                   for c in r.accuracy if c.status == "not-comparable"]
        # one without a fingerprint was compared as before: never silently
        flags += [f"{r.id}: {c.metric} {c.status} against a reference compared without fingerprints ({c.note})"
                  for c in r.accuracy if c.status in {"pass", "fail"} and (c.note or "").startswith(NO_FINGERPRINT)]
    if run.status != "complete":
        cannot.append(f"run is {run.status}, not complete")
    elif (why := unjudged([r.verdict for r in run.scenarios])) is not None:
        cannot.append(why)
    for missing in [i for i in run.selected if i not in by_id]:
        cannot.append(f"{missing}: selected but never ran")
    if baseline is not None:
        changes = compare_runs(baseline, run)
        cannot += [f"{i}: in the baseline run, missing from this run" for i in changes.only_in_a]
        newly = [c for c in changes.newly_failing if c.split(": ", 1)[0] not in held]
        regressions += [f"{c} — newly failing (met its expectation in the baseline)" for c in newly]
        flags += [f"{c} — newly passing" for c in changes.newly_passing]
        flags += changes.no_fingerprint  # compared as before, but said: the protocols could not be checked
    # rates over what could be judged: expected-to-pass scenarios that ran on vLLM (neither an
    # infrastructure error nor skipped because no host could run them)
    judged = [r for r in run.scenarios if r.expect.expect == "pass" and r.verdict not in {"error", "skipped"}
              and r.id not in held]
    load_rate = sum(1 for r in judged if r.load and r.load.ok) / len(judged) if judged else None
    checks = [c for r in judged for c in r.accuracy if c.status in {"pass", "fail"}]
    acc_rate = sum(1 for c in checks if c.status == "pass") / len(checks) if checks else None
    if load_rate is not None and load_rate < min_load_rate:
        regressions.append(f"load success rate {load_rate:.2%} < minimum {min_load_rate:.2%}")
    if acc_rate is not None and acc_rate < min_accuracy_rate:
        regressions.append(f"accuracy pass rate {acc_rate:.2%} < minimum {min_accuracy_rate:.2%}")
    for w in waivers or []:
        if w.state != "active":
            (regressions if fail_on_stale_waivers else flags).append(f"waiver {w.line()}")
    code = EXIT_REGRESSION if regressions else EXIT_INFRA if cannot else EXIT_OK
    return Decision(exit_code=code, rows=rows, regressions=regressions, cannot_judge=cannot, flags=flags,
                    load_rate=load_rate, accuracy_rate=acc_rate,
                    standings=[f"{i}: {st.describe()}" for i, st in history.items()],
                    waivers=[w.line() for w in waivers or []])


def render(d: Decision, run: RunSummary) -> str:
    """The gate's table and lists. Every value comes from files (summary.json, the history), so
    each goes through redact.terminal: escapes shown, not obeyed; an id cut to a bounded width."""
    ids = [terminal(r.id) for r in d.rows]
    w_id = column_width(ids, least=8)
    lines = [f"{'scenario':<{w_id}}  {'verdict':<8}  {'load':<14}  accuracy / note",
             f"{'-' * w_id}  {'-' * 8}  {'-' * 14}  {'-' * 30}"]
    for r, rid in zip(d.rows, ids):
        extra = r.accuracy if r.accuracy != "-" else ""
        extra = "; ".join(x for x in (extra, r.note) if x)
        lines.append(f"{rid:<{w_id}}  {terminal(r.verdict, 8):<8}  {terminal(r.load, 40):<14}  {terminal(extra, LINE)}")
    for rec in run.scenarios:
        for c in rec.accuracy:
            lines.append(f"  {terminal(rec.id)}: {terminal(c.summary(), LINE)}")
    rate = lambda x: "n/a" if x is None else f"{x:.2%}"  # noqa: E731
    lines += ["", f"load success rate {rate(d.load_rate)} · accuracy pass rate {rate(d.accuracy_rate)}"]
    for title, items in (("history (hysteresis: broken after 2 missed runs in a row, fixed after 3 clean; "
                          "flake rate = flips / judged runs, 95% Wilson)", d.standings), ("waivers", d.waivers),
                         ("regressions", d.regressions), ("cannot judge", d.cannot_judge), ("flags", d.flags)):
        if items:
            lines += ["", f"{title}:"] + [f"  - {terminal(i, LINE)}" for i in items]
    lines += ["", f"verdict: {d.word} (exit {d.exit_code})"]
    return "\n".join(lines)
