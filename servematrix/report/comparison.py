"""One run against another: what `servematrix diff` prints and what the gate checks against a
baseline run, decided here once. A scenario is newly failing when its verdict went from meeting its
expectation (pass, xfail) to missing it (fail, xpass), newly passing the other way round; an
error or a skip is no verdict on vLLM, so it is neither (the gate reports it as cannot-judge)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from servematrix.record import RunSummary

MET = {"pass", "xfail"}
MISSED = {"fail", "xpass"}


class RunChanges(BaseModel):
    newly_failing: list[str] = Field(default_factory=list)
    newly_passing: list[str] = Field(default_factory=list)
    accuracy_moves: list[str] = Field(default_factory=list)  # metric moves beyond the check's MDE
    only_in_a: list[str] = Field(default_factory=list)
    only_in_b: list[str] = Field(default_factory=list)

    def sections(self) -> dict[str, list[str]]:
        """Titled lists, in the order `diff` prints them."""
        return {"newly failing": self.newly_failing, "newly passing": self.newly_passing,
                "accuracy moves": self.accuracy_moves, "only in A": self.only_in_a, "only in B": self.only_in_b}


def compare_runs(a: RunSummary, b: RunSummary) -> RunChanges:
    """What changed from run A (before) to run B (after)."""
    a_by = {r.id: r for r in a.scenarios}
    b_ids = {r.id for r in b.scenarios}
    out = RunChanges(only_in_a=[i for i in a_by if i not in b_ids])
    for r in b.scenarios:
        old = a_by.get(r.id)
        if old is None:
            out.only_in_b.append(r.id)
            continue
        if old.verdict in MET and r.verdict in MISSED:
            out.newly_failing.append(f"{r.id}: {old.verdict} → {r.verdict}"
                                     + (f" ({r.failure.signature})" if r.failure else ""))
        elif old.verdict in MISSED and r.verdict in MET:
            out.newly_passing.append(f"{r.id}: {old.verdict} → {r.verdict}")
        for c in r.accuracy:
            before, after = old.metrics.get(c.metric), r.metrics.get(c.metric)
            if before is not None and after is not None and c.mde is not None and abs(after.mean - before.mean) > c.mde:
                out.accuracy_moves.append(f"{r.id}: {c.metric} {before.mean:.4f} → {after.mean:.4f} "
                                          f"(beyond MDE {c.mde:.4f})")
    return out
