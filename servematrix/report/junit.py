"""junit.xml: a test case per scenario and check, for CI systems that read JUnit."""

from __future__ import annotations

from collections import defaultdict
from xml.etree import ElementTree as ET

from servematrix.record import RunSummary, ScenarioRecord
from servematrix.report.grid import cell_signature


def junit_xml(summary: RunSummary) -> str:
    """One testcase per scenario and check (load, smoke, parity, gsm8k) so any CI can show it."""
    suite = ET.Element("testsuite", name=f"servematrix.{summary.matrix}", timestamp=summary.started_at,
                       hostname=summary.host)
    counts = defaultdict(int)
    for r in summary.scenarios:
        for check, status, message, seconds in _checks(r):
            case = ET.SubElement(suite, "testcase", classname=r.id, name=check, time=f"{seconds or 0:.2f}")
            counts["tests"] += 1
            if status in {"failure", "error", "skipped"}:
                counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[status]] += 1
                ET.SubElement(case, status, message=message or "")
    for k in ("tests", "failures", "errors", "skipped"):
        suite.set(k, str(counts[k]))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _checks(r: ScenarioRecord):
    """(check, status, message, seconds) with status ok | failure | error | skipped."""
    if r.verdict == "xfail":
        yield "load", "skipped", f"xfail: {r.note}; got {cell_signature(r)}", r.seconds
        return
    if r.verdict == "twin-incomplete":  # says nothing about vLLM (sweep/incomplete.py)
        yield "load", "skipped", r.note, r.seconds
        return
    if r.verdict == "xpass":
        yield "load", "failure", r.note, r.seconds
    fail = r.failure
    bad = "error" if r.verdict == "error" else "failure"
    if r.load is not None:
        yield ("load", "ok" if r.load.ok else bad,
               None if r.load.ok else (fail.signature if fail else "load failed"), r.load.seconds)
    if r.smoke is not None:
        prompts_ok = all(p.ok for p in r.smoke.prompts)
        problems = "; ".join(pr for p in r.smoke.prompts for pr in p.problems) or r.smoke.error
        yield "smoke", "ok" if prompts_ok else bad, problems, None
        if r.smoke.parity is not None:
            yield "parity", "ok" if r.smoke.parity.ok else "failure", "; ".join(r.smoke.parity.details), None
    if r.embedding is not None:  # a pooling model's smoke and parity
        e = r.embedding
        yield "embedding", "ok" if not (e.problems or e.error) else bad, "; ".join(e.problems) or e.error, None
        if e.parity is not None:
            yield "parity", "ok" if e.parity.ok else "failure", "; ".join(e.parity.details), None
    if r.gsm8k is not None:
        yield "gsm8k", "ok", None, r.gsm8k.seconds
    elif r.gsm8k_error:
        yield "gsm8k", "error" if (fail is None or fail.infra) else "failure", r.gsm8k_error, None
    if r.load is None and fail is not None:
        yield fail.phase, "error" if fail.infra else "failure", fail.signature, None
