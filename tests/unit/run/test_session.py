"""Session scheduling, driven by a scripted pipeline: when each outcome becomes a record (a layout
held for its baseline's record, compared with it, judged once), how the run ends (complete,
interrupted by an outcome, Ctrl-C or SIGTERM, every entry skipped), and what it writes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import pytest

from servematrix.config.matrix import load_matrix
from servematrix.errors import StateError
from servematrix.record import Failure, RunSummary
from servematrix.run import pipeline as pipeline_mod
from servematrix.run import matrix_work as session_mod
from servematrix.run.options import RunOptions
from servematrix.run.pipeline import interrupted
from servematrix.run.session import Session
from servematrix.serve import envs, hardware
from tests.unit.run.doubles import (REPO, ScriptedPipeline, ScriptedServer, StoppableServer, by_id, completion_body,
                                    failed, matrix_file, passed, smoke)

BASE = "tiny-llama/tp1-pp1-fp32"
TP2 = "tiny-llama/tp2-pp1-fp32"
PP2 = "tiny-llama/tp1-pp2-fp32"
KV_TP1 = "tiny-llama-2kv/tp1-pp1-fp32"
KV_TP2 = "tiny-llama-2kv/tp2-pp1-fp32"

LAYOUTS = """
include:
  - {scenario: tiny-llama, tp: 2}
  - scenario: tiny-llama
    pp: 2
    expect: xfail
    reason: PP=2 computes differently from TP=1
    bug: https://example.com/issues/1
    signature: "parity with"
  - {scenario: tiny-llama, tp: 1}
  - {scenario: tiny-llama-2kv, tp: 2}
  - {scenario: tiny-llama-2kv, tp: 1}
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": "0.32.0", "torch": "2.13.0"})
    monkeypatch.setattr(hardware, "probe_gpus", lambda: [])
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: [])


@pytest.fixture
def matrix(tmp_path):
    return matrix_file(tmp_path, LAYOUTS)


def session(matrix, ids, out, pipeline, **options) -> Session:
    entries = [by_id(matrix)[i] for i in ids]
    return Session.of(matrix, entries, RunOptions.of(out, **options), pipeline=pipeline)


def published(summary: RunSummary) -> list[str]:
    return [r.id for r in summary.scenarios]


def record(summary: RunSummary, entry_id: str):
    (rec,) = [r for r in summary.scenarios if r.id == entry_id]
    return rec


def on_disk(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def diverging(matrix, entry_id):
    """A layout whose greedy tokens differ from the baseline's (5, 6, 7) at position 1, with
    neither token in the other's top logprobs: a parity mismatch."""
    scenario = matrix.scenario(by_id(matrix)[entry_id].scenario)
    return lambda e, ids: passed(e, scenario, ids=[5, 8, 7])


# --- records: held for the baseline, compared, judged once --------------------------------------------
def test_a_layout_finishing_before_its_baseline_is_held_then_published_after_it_and_compared(matrix, tmp_path):
    out = tmp_path / "run"
    seen_while_baseline_ran = []

    def baseline(e, ids):
        seen_while_baseline_ran.append([(r["id"], r["verdict"], r["failure"]["kind"])
                                        for r in on_disk(out)["scenarios"]])
        return passed(e, matrix.scenario("tiny-llama"))

    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2), PP2: diverging(matrix, PP2), BASE: baseline})
    summary = session(matrix, [TP2, PP2, BASE, KV_TP2], out, pipeline).run()

    assert pipeline.executed == [TP2, PP2, BASE, KV_TP2]  # the layouts really finished first
    # both layouts were held, and already on disk as pending (not passed) while the baseline ran
    assert seen_while_baseline_ran == [[(TP2, "error", "baseline"), (PP2, "error", "baseline")]]
    assert published(summary) == [BASE, TP2, PP2, KV_TP2]  # the baseline's record first
    tp2 = record(summary, TP2)
    assert tp2.smoke.parity is not None and tp2.smoke.parity.baseline == BASE and not tp2.smoke.parity.ok
    assert tp2.smoke.ok is False
    assert tp2.failure.kind == "check" and tp2.failure.phase == "smoke"
    assert tp2.failure.signature.startswith(f"parity with {BASE}: completion: token 1: 8 vs baseline 6")
    assert tp2.verdict == "fail"  # expected to pass
    pp2 = record(summary, PP2)
    assert pp2.verdict == "xfail"  # expected to fail with a parity signature, and did
    assert pp2.note == "PP=2 computes differently from TP=1 (https://example.com/issues/1)"
    assert record(summary, BASE).verdict == "pass" and record(summary, BASE).smoke.parity is None


def test_every_outcome_is_judged_exactly_once_and_a_layout_only_after_its_comparison(matrix, tmp_path,
                                                                                     monkeypatch):
    judged = []
    real = session_mod.judge

    def spy(outcome):
        judged.append((outcome.id, outcome.smoke.parity is not None if outcome.smoke else None))
        return real(outcome)

    monkeypatch.setattr(session_mod, "judge", spy)
    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2)})
    summary = session(matrix, [TP2, PP2, BASE, KV_TP2], tmp_path / "run", pipeline).run()

    assert sorted(i for i, _ in judged) == sorted([TP2, PP2, BASE, KV_TP2])  # once each
    assert dict(judged) == {BASE: False, TP2: True, PP2: True, KV_TP2: False}  # layouts carry parity when judged
    assert [r.verdict for r in summary.scenarios] == ["pass", "fail", "xpass", "pass"]  # PP2 matched: xpass


def test_a_layout_finishing_after_its_baseline_is_compared_at_once(matrix, tmp_path):
    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2)})
    summary = session(matrix, [BASE, TP2], tmp_path / "run", pipeline).run()

    assert published(summary) == [BASE, TP2]
    assert record(summary, TP2).smoke.parity.baseline == BASE
    assert record(summary, TP2).verdict == "fail"


def test_a_layout_that_matches_its_baseline_passes_parity(matrix, tmp_path):
    summary = session(matrix, [TP2, BASE], tmp_path / "run", ScriptedPipeline(matrix)).run()

    tp2 = record(summary, TP2)
    assert tp2.smoke.parity.ok and tp2.smoke.parity.baseline == BASE
    assert tp2.failure is None and tp2.verdict == "pass"


def test_a_layout_whose_baseline_was_not_selected_is_judged_alone(matrix, tmp_path):
    pipeline = ScriptedPipeline(matrix, {TP2: diverging(matrix, TP2), KV_TP2: diverging(matrix, KV_TP2)})
    summary = session(matrix, [TP2, KV_TP1], tmp_path / "run", pipeline).run()

    # tiny-llama-2kv's baseline ran and generated (5, 6, 7): a different scenario is no reference
    assert published(summary) == [TP2, KV_TP1]
    assert record(summary, TP2).smoke.parity is None
    assert record(summary, TP2).verdict == "pass"
    assert summary.status == "complete" and summary.exit_code == 0


def test_a_baseline_that_failed_its_own_smoke_is_no_reference_for_its_layouts(matrix, tmp_path):
    scenario = matrix.scenario("tiny-llama")
    broken = Failure.of("check", "empty completion", "smoke")
    script = {BASE: lambda e, ids: failed(e, scenario, broken, smoke=smoke(scenario, ok=False)),
              TP2: diverging(matrix, TP2)}
    summary = session(matrix, [TP2, BASE], tmp_path / "run", ScriptedPipeline(matrix, script)).run()

    assert record(summary, BASE).verdict == "fail"
    assert record(summary, TP2).smoke.parity is None and record(summary, TP2).verdict == "pass"
    assert summary.exit_code == 1


# --- how a run ends -------------------------------------------------------------------------------
def test_an_interrupted_outcome_stops_the_pool_and_held_outcomes_are_still_published(matrix, tmp_path):
    scenario = matrix.scenario("tiny-llama-2kv")
    pipeline = ScriptedPipeline(matrix, {KV_TP1: lambda e, ids: failed(e, scenario, interrupted())})
    summary = session(matrix, [TP2, KV_TP1, BASE], tmp_path / "run", pipeline).run()

    assert pipeline.executed == [TP2, KV_TP1]  # nothing started after the interrupted one
    assert summary.status == "interrupted" and summary.exit_code == 2
    assert published(summary) == [KV_TP1, TP2]  # TP2 waited for a baseline that never came
    assert record(summary, KV_TP1).verdict == "error"
    tp2 = record(summary, TP2)  # reported as such: not lost, and not passed without its parity
    assert tp2.verdict == "error" and tp2.smoke.parity is None
    assert tp2.failure.kind == "baseline" and BASE in tp2.failure.signature
    assert summary.counts == {"error": 2}
    assert BASE not in published(summary)  # never run: no record, though selected
    assert BASE in summary.selected
    assert on_disk(tmp_path / "run")["status"] == "interrupted"
    assert pipeline.closed  # the load checks' worlds end with the run, interrupted or not


def test_sigterm_during_an_entry_ends_the_run_interrupted_with_exit_2_even_if_every_record_passed(matrix, tmp_path):
    received = []

    def ours(*args):
        received.append(args)

    previous = signal.signal(signal.SIGTERM, ours)  # the session must replace it while it runs
    try:
        def terminated(e, ids):
            os.kill(os.getpid(), signal.SIGTERM)  # the inline pool runs the entry in this (the main) thread
            time.sleep(1.0)  # the handler raises KeyboardInterrupt long before this ends
            return passed(e, matrix.scenario("tiny-llama"))

        pipeline = ScriptedPipeline(matrix, {BASE: terminated})
        summary = session(matrix, [KV_TP1, BASE, TP2], tmp_path / "run", pipeline).run()
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert received == []  # the session's handler took the signal, not ours
    assert restored is ours  # the handler from before the run came back
    assert pipeline.executed == [KV_TP1, BASE]
    assert summary.status == "interrupted"
    assert published(summary) == [KV_TP1]
    assert record(summary, KV_TP1).verdict == "pass"
    assert summary.exit_code == 2  # an interrupted run is never a clean pass
    assert summary.ended_at is not None


def test_sigterm_during_a_real_pipelines_smoke_stops_its_server_and_starts_nothing_more(matrix, tmp_path,
                                                                                        monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(pipeline_mod, "resolve", lambda scenario, base_dir=None, build=True: str(model))

    def terminate_then_answer(server, path, body):
        os.kill(os.getpid(), signal.SIGTERM)  # lands in the main thread, waiting for this reply
        time.sleep(0.5)
        return completion_body(body.get("model"), [5, 6, 7])

    entries = [by_id(matrix)[i] for i in (BASE, KV_TP1)]
    run = Session.of(matrix, entries, RunOptions.of(tmp_path / "run", gsm8k=False))
    servers = []
    run.work.pipeline.make_server = lambda spec: servers.append(ScriptedServer(spec, reply=terminate_then_answer)) \
        or servers[-1]
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        summary = run.run()
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert len(servers) == 1 and servers[0].stopped  # torn down; the second entry never started one
    assert run.work.pipeline.live == set()
    assert published(summary) == [BASE]
    rec = record(summary, BASE)
    assert rec.failure.kind == "interrupted" and rec.verdict == "error" and rec.attempts == 1
    assert summary.status == "interrupted" and summary.exit_code == 2


def test_ctrl_c_with_gpus_in_parallel_stops_every_live_server_and_records_the_running_entries(tmp_path,
                                                                                            monkeypatch):
    gpus = [hardware.Gpu(index=i, name="H200", memory_gb=140.0, capability=9.0) for i in (0, 1)]
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: gpus)
    matrix = matrix_file(tmp_path, "scenarios: [tiny-llama, tiny-llama-2kv]\naxes: {device: [gpu]}\n")
    ids = ["tiny-llama/tp1-pp1-fp32-gpu", "tiny-llama-2kv/tp1-pp1-fp32-gpu"]
    both_running = threading.Barrier(2, timeout=5)
    servers: list[StoppableServer] = []
    pipeline = ScriptedPipeline(matrix)

    def serving(e, gpu_ids):
        server = StoppableServer()
        servers.append(server)
        pipeline.live.add(server)
        if both_running.wait() == 0:
            time.sleep(0.2)  # the dispatching thread is waiting for results by now
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python raises it in the main thread
        stopped = server.stopped.wait(5)
        pipeline.live.discard(server)
        scenario = matrix.scenario(e.scenario)
        return failed(e, scenario, interrupted()) if stopped else passed(e, scenario)

    pipeline.script.update({i: serving for i in ids})
    summary = session(matrix, ids, tmp_path / "run", pipeline).run()

    assert len(servers) == 2 and all(s.stopped.is_set() for s in servers)
    assert sorted(gpu for _, _, g in pipeline.calls for gpu in g) == [0, 1]  # disjoint GPUs
    assert summary.status == "interrupted" and summary.exit_code == 2
    assert sorted(published(summary)) == sorted(ids)
    assert {r.verdict for r in summary.scenarios} == {"error"}
    assert {r.failure.kind for r in summary.scenarios} == {"interrupted"}


def test_an_exception_escaping_one_parallel_entry_still_stops_the_other_live_servers(tmp_path, monkeypatch):
    """An exception from one job's execute (a full disk, say) stops the servers of the jobs still
    running before it goes up, as Ctrl-C does: vLLM servers live in their own process group, so
    nothing else would stop them. (Found by this test: the pool used to re-raise at once.)"""
    gpus = [hardware.Gpu(index=i, name="H200", memory_gb=140.0, capability=9.0) for i in (0, 1)]
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: gpus)
    matrix = matrix_file(tmp_path, "scenarios: [tiny-llama, tiny-llama-2kv]\naxes: {device: [gpu]}\n")
    broken, serving_id = "tiny-llama/tp1-pp1-fp32-gpu", "tiny-llama-2kv/tp1-pp1-fp32-gpu"
    up = threading.Event()
    server = StoppableServer()
    pipeline = ScriptedPipeline(matrix)

    def serving(e, gpu_ids):
        pipeline.live.add(server)
        up.set()
        server.stopped.wait(2)
        pipeline.live.discard(server)
        return failed(e, matrix.scenario(e.scenario), interrupted())

    def disk_full(e, gpu_ids):
        up.wait(5)
        raise OSError(28, "No space left on device")

    pipeline.script.update({broken: disk_full, serving_id: serving})
    with pytest.raises(OSError, match="No space left"):
        session(matrix, [broken, serving_id], tmp_path / "run", pipeline).run()

    assert on_disk(tmp_path / "run")["status"] == "error"
    assert server.stopped.is_set(), "the run ended with another entry's server still up"


# --- skipped entries -------------------------------------------------------------------------------
def test_gpu_entries_on_a_host_without_gpus_are_skipped_with_their_reason_and_the_run_exits_2(tmp_path):
    matrix = load_matrix(REPO / "matrix/gpu-smoke.yaml")
    pipeline = ScriptedPipeline(matrix)
    summary = Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run"), pipeline=pipeline).run()

    assert pipeline.calls == []  # nothing was handed to the pipeline
    assert summary.status == "complete"
    assert summary.counts == {"skipped": 4}
    assert summary.exit_code == 2  # nothing was judged
    tp1 = record(summary, "tiny-llama/tp1-pp1-fp32-gpu")
    assert tp1.verdict == "skipped"
    assert tp1.note == "needs 1 GPU; this host has 0 that qualify of: no GPU"
    assert record(summary, "tiny-llama/tp2-pp1-fp32-gpu").note.startswith("needs 2 GPUs;")
    assert all(r.seconds == 0.0 and r.smoke is None and r.failure is None for r in summary.scenarios)
    written = on_disk(tmp_path / "run")["scenarios"][0]
    assert "skipped" not in written and written["note"] == tp1.note  # the reason is the note on disk


def test_on_a_one_gpu_host_only_the_wider_layouts_are_skipped_and_held_for_their_baselines(tmp_path, monkeypatch):
    one = [hardware.Gpu(index=3, name="H200", memory_gb=140.0, capability=9.0)]
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: one)
    matrix = load_matrix(REPO / "matrix/gpu-smoke.yaml")
    pipeline = ScriptedPipeline(matrix)
    summary = Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run"), pipeline=pipeline).run()

    assert pipeline.calls == [(1, "tiny-llama/tp1-pp1-fp32-gpu", [3]), (3, "tiny-llama-2kv/tp1-pp1-fp32-gpu", [3])]
    assert published(summary) == ["tiny-llama/tp1-pp1-fp32-gpu", "tiny-llama/tp2-pp1-fp32-gpu",
                                  "tiny-llama-2kv/tp1-pp1-fp32-gpu", "tiny-llama-2kv/tp2-pp1-fp32-gpu"]
    skipped = record(summary, "tiny-llama/tp2-pp1-fp32-gpu")
    assert skipped.verdict == "skipped"
    assert skipped.note == "needs 2 GPUs; this host has 1 that qualify of: H200 (sm 9.0, 140 GB)"
    assert summary.counts == {"pass": 2, "skipped": 2}
    assert summary.exit_code == 0  # what ran passed; the skips are reported, not an error


def test_a_gpu_entry_whose_requirements_no_gpu_of_the_host_meets_is_skipped_naming_them(tmp_path, monkeypatch):
    hopper = [hardware.Gpu(index=i, name="H100", memory_gb=80.0, capability=9.0) for i in (0, 1)]
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: hopper)
    matrix = matrix_file(tmp_path, "include:\n  - {scenario: minimax-m2.5-nvfp4, tp: 2, device: gpu}\n")
    pipeline = ScriptedPipeline(matrix)
    summary = Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run"), pipeline=pipeline).run()

    assert pipeline.calls == []
    (rec,) = summary.scenarios
    assert rec.verdict == "skipped"
    assert rec.note == ("needs 2 GPUs, compute capability >= 10.0, >= 80 GB each; this host has 0 that qualify "
                        "of: H100 (sm 9.0, 80 GB), H100 (sm 9.0, 80 GB)")
    assert summary.exit_code == 2


def test_on_a_mixed_host_an_entry_runs_on_the_gpu_that_meets_its_requirements_instead_of_being_skipped(
        tmp_path, monkeypatch):
    """The pool gives an entry GPUs that meet its requirements: on a host with an A100 (sm 8.0) and
    an H100, the FP8 entry runs on the H100 rather than being handed GPU 0 and then skipped as unfit.
    (Found by this test: the pool used to hand out the first free ids whatever their kind.)"""
    mixed = [hardware.Gpu(index=0, name="A100", memory_gb=80.0, capability=8.0),
             hardware.Gpu(index=1, name="H100", memory_gb=80.0, capability=9.0)]
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: mixed)
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(pipeline_mod, "resolve", lambda scenario, base_dir=None, build=True: str(model))
    matrix = matrix_file(tmp_path, "include:\n  - {scenario: qwen3-0.6b, tp: 1, quant: fp8, device: gpu}\n")
    run = Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run", gsm8k=False))
    servers = []
    run.work.pipeline.make_server = lambda spec: servers.append(ScriptedServer(spec)) or servers[-1]
    summary = run.run()

    (rec,) = summary.scenarios
    assert rec.verdict != "skipped", rec.note
    assert [s.spec.env.get("CUDA_VISIBLE_DEVICES") for s in servers] == ["1"]


# --- counts and exit codes -------------------------------------------------------------------------
@pytest.mark.parametrize("outcomes, counts, code", [
    ({}, {"pass": 3}, 0),
    ({KV_TP1: Failure.of("timeout", "not healthy after 600 s (start-up timeout)")}, {"pass": 2, "error": 1}, 2),
    ({KV_TP1: Failure.of("timeout", "not healthy after 600 s"), TP2: Failure.of("exception", "KeyError: 'x'")},
     {"pass": 1, "fail": 1, "error": 1}, 1),
    ({PP2: Failure.of("exception", "KeyError: 'model.layers.0.k_scale'")}, {"pass": 2, "fail": 1}, 1),
    ({PP2: Failure.of("exception", "AssertionError: parity with tiny-llama")}, {"pass": 2, "xfail": 1}, 0),
], ids=["all-pass", "infra-error", "regression-beats-error", "xfail-with-another-signature", "xfail-as-expected"])
def test_counts_and_exit_code_follow_the_verdicts(matrix, tmp_path, outcomes, counts, code):
    ids = [BASE, KV_TP1, PP2 if PP2 in outcomes else TP2]
    script = {i: (lambda f: lambda e, g: failed(e, matrix.scenario(e.scenario), f))(f) for i, f in outcomes.items()}
    summary = session(matrix, ids, tmp_path / "run", ScriptedPipeline(matrix, script)).run()

    assert summary.counts == counts
    assert summary.exit_code == code
    assert summary.status == "complete"


def test_an_xfail_entry_that_passes_is_an_xpass_and_fails_the_run(matrix, tmp_path):
    summary = session(matrix, [BASE, PP2], tmp_path / "run", ScriptedPipeline(matrix)).run()

    assert record(summary, PP2).verdict == "xpass"
    assert summary.counts == {"pass": 1, "xpass": 1} and summary.exit_code == 1


# --- what the run writes -----------------------------------------------------------------------------
def test_the_reports_and_the_history_row_are_written_beside_the_run(matrix, tmp_path):
    out = tmp_path / "run"
    summary = session(matrix, [TP2, BASE], out, ScriptedPipeline(matrix)).run()

    for name in ("summary.json", "load-success.md", "accuracy.md", "junit.xml", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert RunSummary.model_validate_json((out / "summary.json").read_text()) == summary
    assert summary.run_dir == str(out) and summary.matrix == "unit"
    assert summary.vllm_version == "0.32.0" and summary.torch_version == "2.13.0"
    assert summary.selected == [TP2, BASE]
    assert os.readlink(tmp_path / "latest") == "run"
    grid = (out / "load-success.md").read_text()
    assert "TP2×PP1 fp32" in grid and "Totals: pass: 2" in grid
    assert TP2 in (out / "junit.xml").read_text()
    con = sqlite3.connect(tmp_path / "history.sqlite")
    try:
        runs = con.execute("SELECT run_dir, matrix, status, exit_code, vllm FROM runs").fetchall()
        results = con.execute("SELECT scenario_id, verdict FROM results ORDER BY scenario_id").fetchall()
    finally:
        con.close()
    assert runs == [(str(out), "unit", "complete", 0, "0.32.0")]
    assert results == [(BASE, "pass"), (TP2, "pass")]


def test_a_directory_that_holds_a_run_is_refused_before_anything_runs_unless_overwritten(matrix, tmp_path):
    out = tmp_path / "run"
    session(matrix, [BASE], out, ScriptedPipeline(matrix)).run()
    before = (out / "summary.json").read_text()

    again = ScriptedPipeline(matrix)
    with pytest.raises(StateError, match="already holds a run"):
        session(matrix, [BASE], out, again).run()
    assert again.calls == [] and (out / "summary.json").read_text() == before

    summary = session(matrix, [BASE, TP2], out, ScriptedPipeline(matrix), overwrite=True).run()
    assert published(summary) == [BASE, TP2]
    assert [r["id"] for r in on_disk(out)["scenarios"]] == [BASE, TP2]
