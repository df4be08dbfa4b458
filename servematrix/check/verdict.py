"""Verdicts and exit codes: a scenario's outcome against its expectation, and a run's exit code.

pass / fail: expected to pass, and did / did not.   xfail / xpass: expected to fail, and did / did
not (a strict xpass means the waiver should go).   error: infrastructure, not a verdict on vLLM.
"""

from __future__ import annotations

import re

from servematrix.record import EntryOutcome, Expected, Failure, ScenarioRecord

EXIT_OK, EXIT_REGRESSION, EXIT_INFRA = 0, 1, 2


def decide(expect: Expected, failure: Failure | None) -> tuple[str, str | None]:
    if failure is not None and failure.infra:
        return "error", f"infrastructure ({failure.kind}): {failure.signature}"
    if expect.expect == "pass":
        return ("pass", None) if failure is None else ("fail", None)
    if failure is None:
        note = "expected to fail but passed: fixed upstream? drop the waiver"
        return ("xpass" if expect.strict else "pass"), note
    if expect.signature and not re.search(expect.signature, failure.signature):
        return "fail", f"expected a failure matching /{expect.signature}/, got: {failure.signature}"
    return "xfail", f"{expect.reason} ({expect.bug})"


def judge(outcome: EntryOutcome) -> ScenarioRecord:
    """The one place a verdict is decided: on the final outcome, after compare. A sweep cell whose
    twin lacks what vLLM read is twin-incomplete, pass or fail: its note keeps what the check alone
    said. The outcome's remarks follow the verdict's note."""
    if outcome.skipped is not None:
        verdict, note = "skipped", outcome.skipped
    else:
        verdict, note = decide(outcome.expect, outcome.failure)
        if outcome.incomplete is not None and verdict in ("pass", "fail"):
            f = outcome.failure
            note = (f"twin-incomplete: the twin lacks {outcome.incomplete}; the load check alone said {verdict}"
                    + (f": {f.signature[:200]}" if f else ""))
            verdict = "twin-incomplete"
    note = "; ".join(filter(None, [note, *outcome.remarks])) or None
    return ScenarioRecord.model_validate({**dict(outcome), "verdict": verdict, "note": note})


def unjudged(verdicts: list[str]) -> str | None:
    """Why a run's verdicts say nothing about vLLM (the gate's "cannot judge"), else None."""
    if not verdicts:
        return "nothing to judge: the run holds no scenario"
    if all(v == "skipped" for v in verdicts):
        return "nothing to judge: every scenario was skipped (none fits this host)"
    return None


def exit_code(verdicts: list[str]) -> int:
    """1 if any scenario missed its expectation (a regression is the stronger signal), else 2 if
    any could not be judged (infrastructure) or every one was skipped, else 0. (An empty list is 0
    here: the runner is never handed no entry; the gate refuses a run without any.)"""
    if any(v in {"fail", "xpass"} for v in verdicts):
        return EXIT_REGRESSION
    if any(v == "error" for v in verdicts):
        return EXIT_INFRA
    if verdicts and unjudged(verdicts):
        return EXIT_INFRA  # nothing fit this host: nothing was judged
    return EXIT_OK
