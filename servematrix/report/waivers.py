"""Waivers that expire: every xfail is a waiver, and a waiver is only as good as the evidence that
its bug is still there. Its state, decided here once for `servematrix waivers` and the gate:

- expired: its `until:` has passed — a date before today (UTC), or the entry runs on a release
  at or after the `until` release (release order: versions.version_key, the one place that
  orders releases);
- stale: its bug's fix module (a fix whose `pr` is the waiver's `bug`) reported `already-fixed`
  on the entry's release, in this run or one the history holds; or the entry xpassed in the
  last N runs of the history (the bug did not reproduce);
- active: none of these.

Reads records and history rows only; nothing here runs vLLM."""

from __future__ import annotations

import datetime
from typing import Iterable, Literal

from pydantic import BaseModel, Field, field_validator

from servematrix.errors import StateError
from servematrix.record import RunSummary
from servematrix.redact import column_width, terminal
from servematrix.versions import VersionError, parse_until, version_key

DEFAULT_LAST = 5  # runs of the history an xpass is looked for in
CURRENT = "current"  # the vLLM beside servematrix (serve.envs.CURRENT; not imported: gate stays light)

State = Literal["active", "stale", "expired"]


class Waiver(BaseModel):
    id: str
    release: str  # the entry's vllm axis: a declared release name or "current"
    version: str | None = None  # the vLLM version it ran (or would run) on, where known
    reason: str | None = None
    bug: str | None = None
    until: str | None = None
    strict: bool = True
    origin: str | None = None  # file:line of the matrix entry, or the summary it was read from

    @field_validator("until")
    @classmethod
    def _until(cls, v: str | None) -> str | None:
        if v is not None:
            parse_until(v)  # what _expired reads: refused here, never judged
        return v


class Evidence(BaseModel):
    """What a waiver's state is decided from: fix reports (release, fix name, status, where) and
    each entry's recent results from the history (oldest first, as history.trend returns them)."""

    today: datetime.date
    fix_reports: list[tuple[str, str, str, str]] = Field(default_factory=list)
    results: dict[str, list[dict]] = Field(default_factory=dict)
    last: int = DEFAULT_LAST


class WaiverState(BaseModel):
    waiver: Waiver
    state: State
    why: list[str] = Field(default_factory=list)

    def line(self) -> str:
        until = f" until {self.waiver.until}" if self.waiver.until else ""
        why = f": {'; '.join(self.why)}" if self.why else ""
        return f"{self.waiver.id} [{self.state}]{until}{why}"


def from_entries(entries: Iterable) -> list[Waiver]:
    """The xfail entries of a matrix (config.matrix_spec.Entry), as waivers."""
    return [Waiver(id=e.id, release=e.vllm, reason=e.expectation.reason, until=e.expectation.until,
                   bug=None if e.expectation.bug is None else str(e.expectation.bug),
                   strict=e.expectation.strict, origin=e.origin)
            for e in entries if e.expectation.expect == "xfail"]


def from_run(run: RunSummary) -> list[Waiver]:
    """The xfail records of a run, with the vLLM version each ran on."""
    return [Waiver(id=r.id, release=r.vllm, version=r.vllm_version or run.vllm_version, reason=r.expect.reason,
                   bug=r.expect.bug, until=r.expect.until, strict=r.expect.strict,
                   origin=f"{run.run_dir}/summary.json")
            for r in run.scenarios if r.expect.expect == "xfail"]


def fix_reports_of(run: RunSummary | None, results: dict[str, list[dict]]) -> list[tuple[str, str, str, str]]:
    """(release, fix, status, where) of every fix report in `run` and in the history rows."""
    out = []
    if run is not None:
        out += [(on(r.vllm, r.vllm_version or run.vllm_version), f.name, f.status, f"{r.id} in {run.run_dir}")
                for r in run.scenarios for f in r.fixes]
    for sid, rows in results.items():
        out += [(on(row["release"], row.get("vllm")), f.get("name"), f.get("status"), f"{sid} in {row['run_dir']}")
                for row in rows if row.get("release") for f in row.get("fixes", [])]
    return out


def on(release: str, version: str | None) -> str:
    """Which vLLM a report is about: a declared release is one vLLM; "current" is whichever vLLM
    was beside servematrix then, so it is told apart by its version (current@0.32.0)."""
    if release != CURRENT or not version:
        return release
    return f"{CURRENT}@{version.split('+')[0]}"


def _same_vllm(report: str, waiver: str) -> bool:
    return report == waiver or (waiver == CURRENT and report.startswith(f"{CURRENT}@"))


def judge(w: Waiver, ev: Evidence, fixes_for_bug=None) -> WaiverState:
    """The state of one waiver. `fixes_for_bug(url)`: names of the fix modules backporting it."""
    expired = _expired(w, ev.today)
    stale = []
    for fix in (fixes_for_bug or fix_modules_for)(w.bug):
        here = on(w.release, w.version)
        where = sorted({(rel, loc) for rel, name, status, loc in ev.fix_reports
                        if name == fix and status == "already-fixed" and _same_vllm(rel, here)})
        if where:
            stale.append(f"its fix module {fix} reports already-fixed on {where[0][0]} ({where[0][1]})")
    rows = ev.results.get(w.id, [])[-ev.last:]
    # a non-strict xfail that passes is recorded as "pass", not "xpass": the bug did not reproduce either way
    missed = {"xpass"} if w.strict else {"xpass", "pass"}
    xpassed = [r for r in rows if r.get("verdict") in missed]
    if xpassed:
        stale.append(f"xpassed in {len(xpassed)} of its last {len(rows)} runs (latest {xpassed[-1]['started_at']}): "
                     "the bug did not reproduce")
    state: State = "expired" if expired else "stale" if stale else "active"
    return WaiverState(waiver=w, state=state, why=expired + stale)


def judge_all(waivers: list[Waiver], ev: Evidence) -> list[WaiverState]:
    return [judge(w, ev) for w in waivers]


def _expired(w: Waiver, today: datetime.date) -> list[str]:
    if not w.until:
        return []
    end = parse_until(w.until)  # validated where the waiver was read (matrix or summary): bounded
    if isinstance(end, datetime.date):
        return [f"until {w.until} has passed (today is {today.isoformat()})"] if today > end else []
    try:
        have = version_key(w.version.split("+")[0]) if w.release == CURRENT and w.version else \
            version_key(w.release) if w.release != CURRENT else None
    except VersionError as exc:  # a summary's vllm_version is text another tool may have written
        raise StateError(w.origin or "summary.json", f"waiver {w.id}: its vLLM cannot be ordered against until "
                                                     f"{w.until}: {exc}") from None
    if have is None:  # "current" with no version known: it cannot be ordered against `until`
        return []
    if have >= end[1]:
        on = f"{w.release} (vLLM {w.version})" if w.release == CURRENT else w.release
        return [f"runs on {on}, at or after until {w.until}"]
    return []


def fix_modules_for(bug: str | None) -> list[str]:
    """The fix modules whose upstream PR is `bug` (their `pr` attribute; no vLLM is imported)."""
    if not bug:
        return []
    import servematrix_fixes

    want = _url(bug)
    return [name for name in servematrix_fixes.names() if _url(getattr(servematrix_fixes.load(name), "pr", None)) == want]


def _url(u: str | None) -> str | None:
    return None if u is None else u.strip().rstrip("/").removeprefix("https://").removeprefix("http://")


def stale(states: list[WaiverState]) -> list[WaiverState]:
    return [s for s in states if s.state != "active"]


def render(states: list[WaiverState], note: str = "") -> str:
    """The table `servematrix waivers` prints; every value the user or a run wrote (id, reason,
    bug URL, until) is shown through redact.terminal: secrets masked, escapes shown, width bounded."""
    if not states:
        return "no waivers (no xfail entry)" + (f"\n{terminal(note)}" if note else "")
    ids = [terminal(s.waiver.id) for s in states]
    w_id = column_width(ids)
    lines = [f"{'waiver':<{w_id}}  {'state':<8}  {'until':<11}  why / reason", f"{'-' * w_id}  {'-' * 8}  {'-' * 11}  {'-' * 30}"]
    for s, sid in zip(states, ids):
        text = "; ".join(s.why) if s.why else (s.waiver.reason or "")
        lines.append(f"{sid:<{w_id}}  {s.state:<8}  {terminal(s.waiver.until or '-', 40):<11}  {terminal(text, 2000)}")
        lines.append(f"{'':<{w_id}}  bug {terminal(s.waiver.bug)}" + (f" · {terminal(s.waiver.origin)}" if s.waiver.origin else ""))
    counts = {k: sum(1 for s in states if s.state == k) for k in ("active", "stale", "expired")}
    lines += ["", ", ".join(f"{k}: {v}" for k, v in counts.items())]
    return "\n".join(lines + ([terminal(note, 2000)] if note else []))
