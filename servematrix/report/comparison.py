"""One run against another: what `servematrix diff` prints and what the gate checks against a
baseline run, decided here once. A scenario is newly failing when its verdict went from meeting its
expectation (pass, xfail) to missing it (fail, xpass), newly passing the other way round; an
error or a skip is no verdict on vLLM, so it is neither (the gate reports it as cannot-judge).

Two gsm8k results compare only under the same protocol fingerprint (record.Protocol: questions,
exemplars, prompt, generation settings, seed, tokenizer, harness): a scenario measured otherwise in
the two runs is "not comparable", with what differs, and by default refused (StateError: exit 2);
a record written before fingerprints says "no fingerprint" and is compared as before."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from servematrix.errors import StateError
from servematrix.record import RunSummary, ScenarioRecord

MET = {"pass", "xfail"}
MISSED = {"fail", "xpass"}


class RunChanges(BaseModel):
    newly_failing: list[str] = Field(default_factory=list)
    newly_passing: list[str] = Field(default_factory=list)
    accuracy_moves: list[str] = Field(default_factory=list)  # metric moves beyond the check's MDE
    only_in_a: list[str] = Field(default_factory=list)
    only_in_b: list[str] = Field(default_factory=list)
    not_comparable: list[str] = Field(default_factory=list)  # id: what differs in the protocol
    no_fingerprint: list[str] = Field(default_factory=list)  # id: which run has none (compared as before)

    def sections(self) -> dict[str, list[str]]:
        """Titled lists, in the order `diff` prints them."""
        return {"newly failing": self.newly_failing, "newly passing": self.newly_passing,
                "accuracy moves": self.accuracy_moves, "only in A": self.only_in_a, "only in B": self.only_in_b,
                "not comparable": self.not_comparable, "no fingerprint": self.no_fingerprint}


def protocol_change(old: ScenarioRecord, new: ScenarioRecord) -> tuple[list[str], str | None]:
    """(what differs between the two records' gsm8k protocols, which side has no fingerprint)."""
    if old.gsm8k is None or new.gsm8k is None:
        return [], None  # nothing measured on one side: no number to compare
    if old.gsm8k.protocol is None or new.gsm8k.protocol is None:
        side = "A and B" if old.gsm8k.protocol is None and new.gsm8k.protocol is None else \
            "A" if old.gsm8k.protocol is None else "B"
        return [], side
    return old.gsm8k.protocol.differences(new.gsm8k.protocol), None


def compare_runs(a: RunSummary, b: RunSummary, refuse: bool = True) -> RunChanges:
    """What changed from run A (before) to run B (after). A scenario whose gsm8k protocol differs
    between them is refused (StateError naming what differs) unless `refuse` is False, when it is
    listed as not comparable and left out of the changes."""
    a_by = {r.id: r for r in a.scenarios}
    b_ids = {r.id for r in b.scenarios}
    out = RunChanges(only_in_a=[i for i in a_by if i not in b_ids])
    for r in b.scenarios:
        old = a_by.get(r.id)
        if old is None:
            out.only_in_b.append(r.id)
            continue
        differs, missing = protocol_change(old, r)
        if missing:
            out.no_fingerprint.append(f"{r.id}: no fingerprint in {missing} (written before fingerprints); "
                                      "compared as before")
        if differs:
            out.not_comparable.append(f"{r.id}: " + "; ".join(differs))
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
    if refuse and out.not_comparable:
        raise StateError(Path(b.run_dir) / "summary.json",
                         f"not comparable with {a.run_dir} (gsm8k measured differently): "
                         + " | ".join(out.not_comparable))
    return out
