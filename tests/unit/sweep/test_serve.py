"""The serve step's own contract (the pipeline's serve phase on the twin's command line), with a scripted server double (serve/server.py's Server lifecycle
hooks) and run_smoke scripted: the load check's command line plus a port and one model name, one
greedy completion, and a server that does not start or dies under the request failing that cell with
the server's signature at phase `serve`. Which cells are served is the data file's and the twin's."""

from pathlib import Path

import pytest

from servematrix.record import Failure, PromptResult, SmokeResult
from servematrix.serve.server import LaunchSpec, Server, ServerFailed
from servematrix.sweep import rules, serve


class ScriptedServer(Server):
    """Becomes healthy at once (or dies at start-up with `start_failure`), and may die under a request."""

    started: list = []

    def __init__(self, spec, start_failure=None, dies=False):
        super().__init__(spec)
        self.start_failure, self.dies, self.code = start_failure, dies, None
        ScriptedServer.started.append(spec)

    def _spawn(self):
        if self.start_failure:
            raise ServerFailed(self.start_failure, 1.0)

    def _wait_healthy(self):
        self.healthy_at = self.started_at + 2.5

    def returncode(self):
        return self.code

    def _terminate(self, grace):
        self.code = -15 if self.code is None else self.code

    def log_text(self):
        return "RuntimeError: shape '[1, 4, 64]' is invalid for input of size 128\n" if self.dies else ""


@pytest.fixture
def load_spec(tmp_path):
    return LaunchSpec(argv=["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/twin",
                            "--tensor-parallel-size", "2"], env={"VLLM_CPU_KVCACHE_SPACE": "1"}, port=0,
                      log_path=tmp_path / "server.log", startup_timeout=300)


def smoke(ok=True, error=None):
    prompt = PromptResult(name="completion", endpoint="completions", ok=ok, text=" 72" if ok else "",
                          problems=[] if ok else ["empty completion"])
    return SmokeResult(ok=ok, prompts=[prompt], error=error)


def test_a_served_cell_runs_the_load_checks_command_on_a_port_and_sends_one_greedy_completion(
        load_spec, tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr("servematrix.run.pipeline.run_smoke", lambda url, model, spec: sent.append((url, model, spec))
                        or smoke())
    ScriptedServer.started = []
    parts, failure = serve.serve(load_spec, tmp_path / "serve.log", 300, make_server=ScriptedServer)
    (spec,) = ScriptedServer.started
    assert spec.argv[:6] == load_spec.argv[:6] and spec.env == load_spec.env and spec.log_path.name == "serve.log"
    assert spec.argv[-6:] == ["--host", "127.0.0.1", "--port", str(spec.port), "--served-model-name", "sweep-twin"]
    ((url, model, smoke_spec),) = sent
    assert url == spec.base_url and model == "sweep-twin" and len(smoke_spec.prompts) == 1
    assert not smoke_spec.parity.enabled and smoke_spec.prompts[0].expect.min_tokens == 1
    assert failure is None and parts.smoke.ok and parts.load.ok and parts.load.seconds == 2.5


def test_a_server_that_does_not_start_fails_the_cell_with_its_signature_at_phase_serve(load_spec, tmp_path):
    crash = Failure.of("exception", "RuntimeError: CPU attention does not support sliding window")
    parts, failure = serve.serve(load_spec, tmp_path / "serve.log", 300,
                                 make_server=lambda spec: ScriptedServer(spec, start_failure=crash))
    assert failure.signature == crash.signature and failure.phase == "serve"
    assert parts.load.ok is False and parts.smoke is None


def test_a_server_that_dies_under_the_request_fails_with_the_servers_own_signature(load_spec, tmp_path, monkeypatch):
    def dying(url, model, spec):
        server.code = 1
        return smoke(ok=False, error="completion: request failed: Connection refused")

    server = None

    def make(spec):
        nonlocal server
        server = ScriptedServer(spec, dies=True)
        return server

    monkeypatch.setattr("servematrix.run.pipeline.run_smoke", dying)
    _, failure = serve.serve(load_spec, tmp_path / "serve.log", 300, make_server=make)
    assert failure.phase == "serve" and failure.signature.startswith("RuntimeError: shape")


def test_an_empty_completion_from_a_live_server_is_a_check_failure(load_spec, tmp_path, monkeypatch):
    monkeypatch.setattr("servematrix.run.pipeline.run_smoke", lambda url, model, spec: smoke(ok=False))
    parts, failure = serve.serve(load_spec, tmp_path / "serve.log", 300, make_server=ScriptedServer)
    assert failure.kind == "check" and failure.signature == "empty completion" and parts.smoke.ok is False


def test_an_embedding_cell_sends_the_datas_inputs_to_v1_embeddings_and_wants_vectors_as_wide_as_the_twin(
        load_spec, tmp_path, monkeypatch):
    from servematrix.record import EmbeddingResult

    sent = []
    monkeypatch.setattr("servematrix.run.pipeline.run_embedding_smoke", lambda url, model, spec: sent.append(spec)
                        or EmbeddingResult(ok=False, problems=["question: dimension 64, expected 128"]))
    monkeypatch.setattr("servematrix.run.pipeline.run_smoke", lambda *a: pytest.fail("a completion was asked"))
    parts, failure = serve.serve(load_spec, tmp_path / "serve.log", 300, make_server=ScriptedServer, embed_dim=128)
    (spec,) = sent
    assert spec.embedding.dimension == 128 and not spec.parity.enabled
    assert [x.name for x in spec.embedding.inputs] == [x.name for x in serve.rules().embedding.inputs]
    assert failure.kind == "check" and failure.phase == "serve" and failure.signature.startswith("question: dimension")
    assert parts.embedding is not None and parts.smoke is None


def test_which_cells_are_served_is_data_the_twins_load_only_reason_first():
    rules = serve.ServeRules(prompt={"name": "p", "prompt": "x"},
                             embedding={"inputs": [{"name": "a", "text": "x"}, {"name": "b", "text": "y"}]},
                             quants={"nvfp4": "no NVFP4 kernel on CPU"},
                             model_types={"mamba": "no CPU selective-scan kernel"})
    assert rules.unservable("llama", "none", None) is None
    assert rules.unservable("llama", "nvfp4", None) == "no NVFP4 kernel on CPU"
    assert rules.unservable("mamba", "none", None) == "no CPU selective-scan kernel"
    assert rules.unservable("deepseek_v3", "none", "MLA has no CPU kernels") == "MLA has no CPU kernels"


def test_the_data_files_rules_validate_and_name_the_gpu_only_libraries():
    assert serve.rules().prompt.max_tokens >= 1
    assert serve.gpu_only(Failure.of("exception", "ModuleNotFoundError: No module named 'flash_attn.ops'"))
    assert serve.gpu_only(Failure.of("exception", "AttributeError: module 'triton.language' has no attribute 'x'"))
    assert serve.gpu_only(Failure.of("exception", "RuntimeError: MLA attention requires FlashAttention but it is not "
                                                  "available. Please install flash_attn or use --attention-backend X"))
    assert serve.gpu_only(Failure.of("exception", "ModuleNotFoundError: No module named 'torchvision'"))
    assert serve.gpu_only(Failure.of("exception", "AttributeError: '_OpNamespace' '_C' object has no attribute 'gelu_new'"))
    assert not serve.gpu_only(Failure.of("exception", "AttributeError: 'LlamaModel' object has no attribute 'norm'"))
    assert not serve.gpu_only(Failure.of("exception", "ModuleNotFoundError: No module named 'cutlass_helpers'"))
    assert not serve.gpu_only(Failure.of("exception", "KeyError: 'layers.1.mlp.gate.weight'"))
    assert Path(rules.FILE).name == "sweep-quants.yaml"
