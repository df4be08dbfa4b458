"""Per-entry records on disk: what a run has measured survives any later moment of the run,
SIGKILL included (which runs no cleanup). Each entry's files live in its own directory beside its
server.log, each written atomically (temp file + rename), as soon as the entry finishes:

- `<id>/outcome.json`: the entry's outcome before its verdict (what a later comparison needs: the
  smoke tokens and logprobs, gsm8k per-question results, timings); a layout held for its baseline
  is compared with this file's content when the baseline's record arrives;
- `<id>/record.json`: the entry's record with its verdict, once it has one. A layout still waiting
  for its baseline has the *pending* record (an infrastructure error naming the baseline: not lost,
  not passed) until the comparison replaces it, and keeps it if the baseline never finishes.

`recover(run_dir)` reads them back: the records a summary can be rebuilt from after a kill."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from servematrix.check.verdict import decide
from servematrix.record import EntryOutcome, Failure, ScenarioRecord
from servematrix.files import atomic_write

OUTCOME, RECORD = "outcome.json", "record.json"


def entry_dir(run_dir: Path, entry_id: str) -> Path:
    return Path(run_dir) / entry_id  # ids are `<scenario>/<layout>`: the directory of server.log


def save_outcome(run_dir: Path, outcome: EntryOutcome) -> None:
    atomic_write(entry_dir(run_dir, outcome.id) / OUTCOME, outcome.model_dump_json(indent=1))


def save_record(run_dir: Path, rec: ScenarioRecord) -> None:
    atomic_write(entry_dir(run_dir, rec.id) / RECORD, rec.model_dump_json(indent=1))


def load_outcome(run_dir: Path, entry_id: str) -> EntryOutcome:
    return EntryOutcome.model_validate_json((entry_dir(run_dir, entry_id) / OUTCOME).read_text())


def no_baseline(outcome: EntryOutcome, base: str) -> EntryOutcome:
    """The outcome of a layout whose baseline's record is not in (yet, or ever): its own failure if
    it has one (no comparison could make it pass), else a `baseline` failure, never a pass."""
    if outcome.failure is not None:
        return outcome
    failure = Failure.of("baseline", f"baseline {base} has not finished: parity and agreement not judged",
                         "compare")
    return outcome.model_copy(update={"failure": failure})


def pending(outcome: EntryOutcome, base: str) -> ScenarioRecord:
    """The provisional record of a layout held for its baseline, published (summary.json and
    record.json) at once so a kill before the baseline finishes keeps it. Built with verdict's own
    rule, not `judge`: the layout's verdict is judged once, after its comparison."""
    held = no_baseline(outcome, base)
    verdict, note = decide(held.expect, held.failure)
    return ScenarioRecord.model_validate({**dict(held), "verdict": verdict, "note": note})


def recover(run_dir: Path) -> list[ScenarioRecord]:
    """Every entry record on disk under `run_dir` (an entry with an outcome but no record yet is
    given its pending record), sorted by id; unreadable files are skipped (a foreign file)."""
    found: dict[str, ScenarioRecord] = {}
    for path in sorted(Path(run_dir).rglob(RECORD)):
        try:
            rec = ScenarioRecord.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            continue
        found[rec.id] = rec
    for path in sorted(Path(run_dir).rglob(OUTCOME)):
        try:
            outcome = EntryOutcome.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            continue
        if outcome.id not in found:
            found[outcome.id] = pending(outcome, "(unknown)")
    return [found[k] for k in sorted(found)]
