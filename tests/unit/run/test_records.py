"""Per-entry records on disk: each entry's outcome and record are written the moment it finishes,
a held layout is compared with its outcome as read back from disk, and what a SIGKILL at any
later moment leaves behind (a copy of the run directory taken then) still holds every finished
entry, a layout waiting for its baseline as pending (not passed). Scripted pipeline, no vLLM."""

from __future__ import annotations

import json
import shutil

import pytest

from servematrix.record import EntryOutcome, Failure
from servematrix.run import records
from servematrix.serve import envs, hardware
from tests.unit.run.doubles import ScriptedPipeline, failed, matrix_file, passed
from tests.unit.run.test_session import BASE, KV_TP1, LAYOUTS, TP2, diverging, record, session


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": "0.32.0", "torch": "2.13.0"})
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: [])


@pytest.fixture
def matrix(tmp_path):
    return matrix_file(tmp_path, LAYOUTS)


def on_disk(out, entry_id: str, name: str) -> dict:
    return json.loads((out / entry_id / name).read_text())


def test_a_layout_held_for_its_baseline_is_on_disk_as_pending_before_the_baseline_finishes(matrix, tmp_path):
    out, seen = tmp_path / "run", {}

    def baseline(e, ids):
        seen["outcome"] = on_disk(out, TP2, records.OUTCOME)
        seen["record"] = on_disk(out, TP2, records.RECORD)
        return passed(e, matrix.scenario("tiny-llama"))

    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2), BASE: baseline})
    summary = session(matrix, [TP2, BASE], out, pipeline).run()

    assert seen["outcome"]["smoke"]["prompts"][0]["generation"]["token_ids"] == [5, 8, 7]  # what compare needs
    assert seen["record"]["verdict"] == "error" and seen["record"]["failure"]["kind"] == "baseline"
    final = on_disk(out, TP2, records.RECORD)  # replaced by the compared, judged record
    assert final["verdict"] == "fail" and final["smoke"]["parity"]["baseline"] == BASE
    assert final == json.loads(record(summary, TP2).model_dump_json())
    assert on_disk(out, BASE, records.RECORD)["verdict"] == "pass"
    assert not list(out.rglob(".record.json.*")) and not list(out.rglob(".outcome.json.*"))  # no temp left


def test_a_held_layout_is_compared_with_its_outcome_as_persisted_not_a_copy_in_memory(matrix, tmp_path):
    out = tmp_path / "run"

    def baseline(e, ids):
        # rewrite the held layout's persisted tokens to the baseline's: if compare read memory,
        # the layout would still diverge and fail
        path = out / TP2 / records.OUTCOME
        outcome = EntryOutcome.model_validate_json(path.read_text())
        agreeing = passed(by_entry(matrix, TP2), matrix.scenario("tiny-llama"))
        path.write_text(outcome.model_copy(update={"smoke": agreeing.smoke}).model_dump_json())
        return passed(e, matrix.scenario("tiny-llama"))

    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2), BASE: baseline})
    summary = session(matrix, [TP2, BASE], out, pipeline).run()
    assert record(summary, TP2).verdict == "pass" and record(summary, TP2).smoke.parity.ok


def by_entry(matrix, entry_id):
    (entry,) = [e for e in matrix.entries if e.id == entry_id]
    return entry


def test_what_a_kill_during_a_later_entry_leaves_keeps_every_finished_entry(matrix, tmp_path):
    out, killed = tmp_path / "run", tmp_path / "killed"

    def last(e, ids):  # a SIGKILL now: the run directory as it is at this moment is all that stays
        shutil.copytree(out, killed)
        return passed(e, matrix.scenario("tiny-llama"))

    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2), BASE: last})
    session(matrix, [KV_TP1, TP2, BASE], out, pipeline).run()

    recovered = {r.id: r for r in records.recover(killed)}
    assert set(recovered) == {KV_TP1, TP2}
    assert recovered[KV_TP1].verdict == "pass"
    assert recovered[TP2].verdict == "error" and recovered[TP2].failure.kind == "baseline"  # not passed
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running"
    assert {(r["id"], r["verdict"]) for r in summary["scenarios"]} == {(KV_TP1, "pass"), (TP2, "error")}


def test_an_outcome_without_a_record_is_recovered_as_pending_and_a_foreign_file_is_skipped(matrix, tmp_path):
    outcome = passed(by_entry(matrix, TP2), matrix.scenario("tiny-llama"))
    records.save_outcome(tmp_path, outcome)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / records.RECORD).write_text("{not json")
    (rec,) = records.recover(tmp_path)
    assert rec.id == TP2 and rec.verdict == "error" and rec.failure.kind == "baseline"


def test_a_held_layout_that_failed_on_its_own_keeps_its_own_failure_while_pending(matrix, tmp_path):
    outcome = failed(by_entry(matrix, TP2), matrix.scenario("tiny-llama"),
                     Failure.of("exception", "KeyError: 'qkv_proj'"))
    rec = records.pending(outcome, BASE)
    assert rec.verdict == "fail" and rec.failure.signature == "KeyError: 'qkv_proj'"
