"""Pipeline: one entry into one EntryOutcome, driven against a scripted server (a tiny OpenAI-format
HTTP server on the spec's port standing in for vLLM). Retries of infrastructure failures, a
failed request told apart from the server's death, the cancelled event, and no verdict before
the session's judge."""

from __future__ import annotations

import socket
import time

import pytest

from servematrix.check.verdict import judge
from servematrix.checkpoint.resolve import ModelUnavailable
from servematrix.config.matrix import load_matrix
from servematrix.check.gsm8k import Gsm8kFailed
from servematrix.record import EntryOutcome, Gsm8kResult, ScenarioRecord
from servematrix.run import pipeline as pipeline_mod
from servematrix.run.options import RunOptions
from servematrix.run.pipeline import Pipeline
from servematrix.serve import envs
from servematrix.serve.hardware import Gpu
from tests.unit.run.doubles import DROP, REPO, ScriptedServer, matrix_file

BASE = "tiny-llama/tp1-pp1-fp32"
XFAIL_PP2 = "tiny-llama/tp1-pp2-fp32"


@pytest.fixture(scope="module")
def matrix():
    return load_matrix(REPO / "matrix/cpu-smoke.yaml")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": "0.32.0", "torch": "2.13.0"})
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(pipeline_mod, "resolve", lambda scenario, base_dir=None, build=True: str(model))


class Harness:
    """A Pipeline whose servers are ScriptedServers made by `server(spec, n)` (n: 1 for the first)."""

    def __init__(self, matrix, out, server=None, **options):
        self.matrix = matrix
        options.setdefault("gsm8k", False)
        self.pipeline = Pipeline(matrix, RunOptions.of(out, **options).entry, self._heard)
        self.servers: list[ScriptedServer] = []
        self.phases: list[str] = []
        self._server = server or (lambda spec, n: ScriptedServer(spec))
        self.pipeline.make_server = self._make

    def _heard(self, k, entry_id, text):
        self.phases.append(text)

    def _make(self, spec):
        s = self._server(spec, len(self.servers) + 1)
        self.servers.append(s)
        return s

    def run(self, entry_id: str = BASE) -> EntryOutcome:
        entry = next(e for e in self.matrix.entries if e.id == entry_id)
        return self.pipeline.execute(1, entry, [])


# --- a served entry -----------------------------------------------------------------------------
def test_a_healthy_server_gives_an_outcome_with_no_verdict_that_judge_turns_into_a_record(matrix, tmp_path):
    h = Harness(matrix, tmp_path / "run")
    out = h.run()

    assert type(out) is EntryOutcome and not isinstance(out, ScenarioRecord)
    assert "verdict" not in out.model_dump() and not hasattr(out, "verdict")
    assert out.failure is None and out.attempts == 1
    assert out.load.ok and out.load.seconds is not None
    assert out.smoke.ok and [p.name for p in out.smoke.prompts] == ["completion", "short-prompt", "chat"]
    assert [p.generation.token_ids for p in out.smoke.prompts] == [[5, 6, 7]] * 3
    assert out.smoke.prompts[0].generation.top_logprobs[0] == {5: -0.1, 999: -3.0}
    assert out.smoke.parity is None  # parity is the session's comparison, made afterwards
    assert (out.vllm_version, out.torch_version) == ("0.32.0", "2.13.0")
    assert out.model == "tiny-llama" and out.gsm8k is None
    assert f"--port {h.servers[0].spec.port}" in out.server_command
    assert h.servers[0].requests == ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
    assert h.servers[0].stopped and h.pipeline.live == set()  # torn down, and no longer live
    assert h.servers[0].spec.startup_timeout == 600  # the scenario's: neither CLI nor matrix set one

    rec = judge(out)
    assert isinstance(rec, ScenarioRecord) and rec.verdict == "pass" and rec.note is None
    assert rec.smoke == out.smoke and rec.attempts == 1


@pytest.mark.parametrize("cli, matrix_value, expected", [(None, None, 600.0), (None, 30, 30.0), (7, 30, 7.0)])
def test_the_server_waits_the_command_lines_start_up_timeout_else_the_matrixs_else_the_scenarios(
        tmp_path, cli, matrix_value, expected):
    body = (f"startup_timeout: {matrix_value}\n" if matrix_value else "") + "scenarios: [tiny-llama]\n"
    h = Harness(matrix_file(tmp_path, body), tmp_path / "run", startup_timeout=cli)
    out = h.run()
    assert out.failure is None and h.servers[0].spec.startup_timeout == expected


def test_an_entry_given_gpus_that_miss_its_requirements_is_skipped_before_anything_starts(tmp_path):
    matrix = matrix_file(tmp_path, "include:\n  - {scenario: minimax-m2.5-nvfp4, tp: 2, device: gpu}\n")
    hopper = [Gpu(index=i, name="H100", memory_gb=80.0, capability=9.0) for i in (0, 1, 2)]
    h = Harness(matrix, tmp_path / "run")
    (entry,) = matrix.entries
    out = h.pipeline.execute(1, entry, [1, 2], hopper)

    assert out.skipped.startswith("needs 2 GPUs, compute capability >= 10.0")
    assert out.failure is None and h.servers == [] and out.seconds == 0.0
    assert judge(out).verdict == "skipped" and judge(out).note == out.skipped


# --- retries -------------------------------------------------------------------------------------
def test_a_port_in_use_is_an_infrastructure_failure_retried_once_on_a_new_port(matrix, tmp_path):
    squatters: list[socket.socket] = []

    def server(spec, n):
        if n == 1:  # someone else takes the first port between picking it and the server's start
            s = socket.socket()
            s.bind((spec.host, spec.port))
            s.listen()
            squatters.append(s)
        return ScriptedServer(spec)

    h = Harness(matrix, tmp_path / "run", server)
    try:
        out = h.run()
    finally:
        for s in squatters:
            s.close()

    assert out.attempts == 2
    assert out.failure is None and out.smoke.ok
    assert len(h.servers) == 2 and h.servers[0].spec.port != h.servers[1].spec.port
    assert h.servers[0].requests == []  # the first never served
    assert "infrastructure failure (port-in-use), retrying" in h.phases
    assert judge(out).verdict == "pass"


def test_a_server_that_dies_because_its_port_was_taken_is_classified_port_in_use_and_retried(matrix, tmp_path):
    taken = "ERROR 11-22 12:46:11 [api_server.py:1] OSError: [Errno 98] Address already in use"
    h = Harness(matrix, tmp_path / "run",
                lambda spec, n: ScriptedServer(spec, die_on_load=taken) if n == 1 else ScriptedServer(spec))
    out = h.run()

    assert out.attempts == 2 and out.failure is None and len(h.servers) == 2
    assert h.servers[0].failure.kind == "port-in-use"  # what the first attempt died of


def test_an_infrastructure_failure_that_persists_is_retried_once_then_recorded_as_an_error(matrix, tmp_path):
    h = Harness(matrix, tmp_path / "run", lambda spec, n: ScriptedServer(spec, healthy=False), startup_timeout=0.3)
    out = h.run()

    assert out.attempts == 2 and len(h.servers) == 2  # retries=1: one more attempt, not more
    assert out.failure.kind == "timeout" and out.failure.infra and out.failure.phase == "load"
    assert out.load.ok is False and out.load.error == out.failure
    assert out.smoke is None
    rec = judge(out)
    assert rec.verdict == "error" and rec.note.startswith("infrastructure (timeout)")


def test_a_load_failure_of_kind_exception_is_not_retried(matrix, tmp_path):
    h = Harness(matrix, tmp_path / "run",
                lambda spec, n: ScriptedServer(spec, die_on_load="KeyError: 'model.layers.0.self_attn.k_scale'"))
    out = h.run()

    assert out.attempts == 1 and len(h.servers) == 1
    assert out.failure.kind == "exception" and not out.failure.infra
    assert out.failure.signature == "KeyError: 'model.layers.0.self_attn.k_scale'"
    assert out.failure.phase == "load"
    assert out.load.ok is False and out.load.error == out.failure and out.smoke is None
    assert judge(out).verdict == "fail"


def test_a_model_that_cannot_be_resolved_is_an_infrastructure_error_that_is_not_retried(matrix, tmp_path,
                                                                                        monkeypatch):
    def unavailable(scenario, base_dir=None, build=True):
        raise ModelUnavailable(f"scenario {scenario.name}: not in the local cache")

    monkeypatch.setattr(pipeline_mod, "resolve", unavailable)
    h = Harness(matrix, tmp_path / "run")
    out = h.run()

    assert out.attempts == 1 and h.servers == []
    assert out.failure.kind == "model" and out.failure.infra and out.failure.phase == "load"
    assert judge(out).verdict == "error"


# --- smoke: a failed request, or a failed check ------------------------------------------------------
def test_a_smoke_transport_error_on_a_server_that_then_dies_is_recorded_as_the_death_from_its_log(matrix,
                                                                                                tmp_path):
    def dying(server, path, body):
        server.die("RuntimeError: EngineCore died: CUDA illegal memory access", after=0.3)
        return DROP

    h = Harness(matrix, tmp_path / "run", lambda spec, n: ScriptedServer(spec, reply=dying))
    out = h.run()

    assert out.smoke.error is not None and "request failed" in out.smoke.error
    assert out.failure.kind == "exception" and out.failure.phase == "smoke"
    assert out.failure.signature == "RuntimeError: EngineCore died: CUDA illegal memory access"
    assert h.servers[0].failure == out.failure  # the server's own classification of its death
    assert out.attempts == 1  # a crash is a verdict on vLLM, not retried
    assert out.gsm8k_error == "skipped: smoke failed"
    assert out.load.ok  # it did load
    assert judge(out).verdict == "fail"


def test_a_smoke_transport_error_on_a_server_that_stays_up_is_the_request_failure(matrix, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "DEATH_GRACE", 0.3)
    h = Harness(matrix, tmp_path / "run", lambda spec, n: ScriptedServer(spec, reply=lambda s, p, b: DROP))
    t0 = time.monotonic()
    out = h.run()

    assert time.monotonic() - t0 >= 0.3  # it gave the server the grace to die first
    assert out.failure.kind == "exception" and out.failure.phase == "smoke"
    assert out.failure.signature.startswith("completion: request failed")
    assert h.servers[0].requests == ["/v1/completions"]  # smoke stops at the first failed request


def test_a_smoke_check_failure_on_a_live_server_is_a_check_failure_without_waiting_for_the_death_grace(
        matrix, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "DEATH_GRACE", 30.0)
    h = Harness(matrix, tmp_path / "run", lambda spec, n: ScriptedServer(spec, ids=[]))
    t0 = time.monotonic()
    out = h.run()

    assert time.monotonic() - t0 < 10.0  # nowhere near DEATH_GRACE
    assert out.failure.kind == "check" and out.failure.phase == "smoke" and not out.failure.infra
    assert out.failure.signature == "empty completion"
    assert out.smoke.error is None and out.smoke.ok is False
    assert len(h.servers[0].requests) == 3  # every prompt was still asked
    assert out.attempts == 1 and out.gsm8k_error == "skipped: smoke failed"
    assert judge(out).verdict == "fail"


def test_an_xfail_entry_whose_server_dies_with_its_signature_is_judged_xfail(matrix, tmp_path):
    def dying(server, path, body):
        server.die("AssertionError: assert self.intermediate_tensors is not None", after=0.1)
        return DROP

    h = Harness(matrix, tmp_path / "run", lambda spec, n: ScriptedServer(spec, reply=dying))
    out = h.run(XFAIL_PP2)

    assert out.failure.signature == "AssertionError: assert self.intermediate_tensors is not None"
    assert "--pipeline-parallel-size 2" in out.server_command
    rec = judge(out)
    assert rec.verdict == "xfail" and rec.expect.expect == "xfail"


# --- cancelled ---------------------------------------------------------------------------------------
def test_a_cancelled_event_set_while_an_entry_runs_makes_its_outcome_interrupted_and_is_not_retried(matrix,
                                                                                                  tmp_path):
    h = Harness(matrix, tmp_path / "run")
    live_then: list[bool] = []

    def server(spec, n):
        s = ScriptedServer(spec)
        original = s.answer

        def answer(path, body):
            live_then.append(s in h.pipeline.live)
            h.pipeline.cancelled.set()  # Ctrl-C in a threaded pool: the session sets it mid-request
            return original(path, body)

        s.answer = answer
        return s

    h._server = server
    out = h.run()

    assert out.failure.kind == "interrupted" and out.failure.infra and out.failure.phase == "run"
    assert out.attempts == 1 and len(h.servers) == 1
    assert live_then[0] is True  # while it served, a canceller could find it to stop it
    assert h.servers[0].stopped and h.pipeline.live == set()
    rec = judge(out)
    assert rec.verdict == "error" and "interrupted" in rec.note


# --- gsm8k (lm-eval stubbed) ----------------------------------------------------------------------------
def gsm8k_result(n=8):
    return Gsm8kResult(strict=0.25, strict_stderr=0.1, flexible=0.5, flexible_stderr=0.1, n=n, seconds=1.0)


def test_gsm8k_asks_the_command_lines_limit_and_its_scores_become_metrics(matrix, tmp_path, monkeypatch):
    asked = []

    def run(base_url, model, spec, limit, out_dir, alive, python, tokenizer):
        asked.append((limit, alive()))
        return gsm8k_result(limit)

    monkeypatch.setattr(pipeline_mod.gsm8k, "run", run)
    out = Harness(matrix, tmp_path / "run", gsm8k=True, gsm8k_limit=3).run()

    assert asked == [(3, True)]  # --limit beats the scenario's 8; asked while the server was up
    assert out.failure is None and out.gsm8k.n == 3
    assert set(out.metrics) == {"gsm8k.strict", "gsm8k.flexible"}
    assert out.metrics["gsm8k.flexible"].mean == 0.5 and out.metrics["gsm8k.flexible"].n == 3


def test_gsm8k_uses_the_scenarios_limit_when_neither_command_line_nor_matrix_sets_one(matrix, tmp_path,
                                                                                     monkeypatch):
    asked = []
    monkeypatch.setattr(pipeline_mod.gsm8k, "run", lambda url, model, spec, limit, *a: asked.append(limit)
                        or gsm8k_result(limit))
    Harness(matrix, tmp_path / "run", gsm8k=True).run()
    assert asked == [8]  # scenarios/tiny-llama.yaml


def test_a_gsm8k_failure_while_the_server_died_is_the_servers_death_and_not_retried(matrix, tmp_path,
                                                                                   monkeypatch):
    def run(base_url, model, spec, limit, out_dir, alive, python, tokenizer):
        h.servers[-1].die("RuntimeError: EngineCore died during decode")
        deadline = time.monotonic() + 2
        while alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise Gsm8kFailed("server died during gsm8k")

    monkeypatch.setattr(pipeline_mod.gsm8k, "run", run)
    h = Harness(matrix, tmp_path / "run", gsm8k=True)
    out = h.run()

    assert out.failure.kind == "exception" and out.failure.phase == "gsm8k"
    assert out.failure.signature == "RuntimeError: EngineCore died during decode"
    assert out.gsm8k_error == "server died during gsm8k"  # what lm-eval's stage recorded is kept
    assert out.attempts == 1 and out.smoke.ok
    assert judge(out).verdict == "fail"


def test_lm_eval_failing_beside_a_healthy_server_is_a_tool_failure_retried_once(matrix, tmp_path, monkeypatch):
    def run(*args):
        raise Gsm8kFailed("lm-eval exited with 1: ImportError: lm_eval")

    monkeypatch.setattr(pipeline_mod.gsm8k, "run", run)
    h = Harness(matrix, tmp_path / "run", gsm8k=True)
    out = h.run()

    assert out.failure.kind == "tool" and out.failure.infra and out.failure.phase == "gsm8k"
    assert out.attempts == 2 and len(h.servers) == 2
    assert judge(out).verdict == "error"
