"""Embedding smoke and parity (check.embedding), the scenario's embedding form (config), the
compare hook and the pipeline's embedding path (an embedding scenario gets no completion smoke and
no gsm8k). The HTTP side is a tiny OpenAI-format /v1/embeddings server; no vLLM."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from servematrix.check import embedding
from servematrix.check.compare import compare
from servematrix.check.verdict import judge
from servematrix.config.embedding_spec import EmbeddingSmoke
from servematrix.config.scenario import ScenarioStore, SmokeSpec
from servematrix.config.yamlio import ConfigError
from servematrix.record import EmbeddingResult, EmbeddingVector, LoadResult
from servematrix.run.pipeline import now_iso, outcome_for
from servematrix.run import pipeline as pipeline_mod
from servematrix.run.options import RunOptions
from servematrix.run.pipeline import Pipeline
from servematrix.serve import envs
from tests.unit.run.doubles import REPO, ScriptedServer, by_id, matrix_file

SCENARIO = ScenarioStore(REPO / "scenarios").get("all-minilm-l6-v2")
SPEC = SCENARIO.smoke.embedding
BASE, TP2 = "all-minilm-l6-v2/tp1-pp1-fp32", "all-minilm-l6-v2/tp2-pp1-fp32"


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


# Two topics (cats, weather) and one unrelated sentence, as directions in 384 dimensions.
def topic(i: int, j: int | None = None, w: float = 0.2) -> list[float]:
    v = [0.0] * 384
    v[i] = 1.0
    if j is not None:
        v[j] = w
    return unit(v)


GOOD = {"cat-mat": topic(0, 1), "cat-rug": topic(0, 2), "stocks": topic(3), "weather": topic(4, 5),
        "weather-para": topic(4, 6)}


def vectors(table: dict[str, list[float]]) -> list[EmbeddingVector]:
    return embedding.vectors_of(SPEC, [table[x.name] for x in SPEC.inputs])


# --- the expectations --------------------------------------------------------------------------------
def test_paraphrases_closer_than_unrelated_unit_vectors_of_the_right_dimension_pass():
    cosines, problems = embedding.judge(SPEC, vectors(GOOD))
    assert problems == []
    assert cosines["cat-mat|cat-rug"] == pytest.approx(1 / 1.04)
    assert cosines["cat-mat|stocks"] == 0.0


def test_a_paraphrase_pair_no_closer_than_an_unrelated_pair_is_named_with_both_cosines():
    moved = {**GOOD, "cat-rug": topic(3, 7)}  # the "paraphrase" now lies in the stocks direction
    cosines, problems = embedding.judge(SPEC, vectors(moved))
    assert problems == ["expected cos(cat-mat, cat-rug) = 0.0000 > cos(cat-mat, stocks) = 0.0000"]
    assert cosines["weather|cat-rug"] == 0.0  # the other orderings still hold


def test_wrong_dimension_norm_and_non_finite_values_are_each_a_problem():
    bad = {**GOOD, "stocks": [2 * x for x in GOOD["stocks"]], "weather": GOOD["weather"][:383],
           "cat-rug": [math.nan] * 384}
    _, problems = embedding.judge(SPEC, vectors(bad))
    assert "stocks: norm 2.000000, expected unit norm (±0.001)" in problems
    assert "weather: dimension 383, expected 384" in problems
    assert "cat-rug: vector has non-finite values" in problems


def test_a_zero_vector_has_no_direction_and_fails_the_ordering():
    _, problems = embedding.judge(SPEC.model_copy(update={"normalized": False}),
                                  vectors({**GOOD, "cat-rug": [0.0] * 384}))
    assert problems == ["expected cos(cat-mat, cat-rug) = nan > cos(cat-mat, stocks) = 0.0000",
                        "expected cos(weather, weather-para) = 0.9615 > cos(weather, cat-rug) = nan"]


def test_fewer_vectors_than_inputs_is_a_problem():
    _, problems = embedding.judge(SPEC, vectors(GOOD)[:4])
    assert problems[0] == "expected 5 vectors, got 4"


# --- parity: vLLM's check_embeddings_close ------------------------------------------------------------
def test_parity_passes_at_cosine_0_999_and_fails_below_naming_the_input():
    a = vectors(GOOD)
    near = [v.model_copy(update={"vector": unit([x + (1e-3 if i == 9 else 0) for i, x in enumerate(v.vector)])})
            for v in a]
    par, cosines = embedding.embeddings_close(near, a, BASE, 0.999)
    assert par.ok and par.details == [] and min(cosines.values()) > 0.9999

    tilted = [*a[:2], a[2].model_copy(update={"vector": topic(3, 8, 0.05)}), *a[3:]]  # cos 0.99875
    par, cosines = embedding.embeddings_close(tilted, a, BASE, 0.999)
    assert not par.ok and par.baseline == BASE
    assert par.details == [f"stocks: cosine with baseline {cosines['stocks']:.6f} < 0.999"]
    assert cosines["stocks"] == pytest.approx(1 / math.sqrt(1.0025))


def test_parity_names_missing_and_differently_sized_vectors():
    a = vectors(GOOD)
    short = [a[0].model_copy(update={"dimension": 383, "vector": a[0].vector[:383]}), *a[1:]]
    par, _ = embedding.embeddings_close(short + [a[0].model_copy(update={"name": "extra"})], a, BASE, 0.999)
    assert par.details == ["cat-mat: dimension 383 vs baseline 384", "extra: no baseline vector to compare"]
    assert not embedding.embeddings_close([], a, BASE, 0.999)[0].ok


# --- compare's hook on records --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return matrix_file(tmp_path_factory.mktemp("m"), "scenarios: [all-minilm-l6-v2]\naxes: {tp: [1, 2]}\n")


def outcome(matrix, entry_id, table=GOOD, **fields):
    res = EmbeddingResult(ok=True, vectors=vectors(table))
    return outcome_for(by_id(matrix)[entry_id], model=SCENARIO.model_name, started_at=now_iso(), seconds=1.0,
                       load=LoadResult(ok=True, seconds=1.0), embedding=fields.pop("embedding", res), **fields)


def test_compare_records_parity_cosines_and_a_mismatch_fails_the_layout(matrix):
    base = judge(outcome(matrix, BASE))
    same = compare(outcome(matrix, TP2), base, SCENARIO, lambda m: None)
    assert same.failure is None and same.embedding.parity.ok
    assert set(same.embedding.parity_cosines) == {x.name for x in SPEC.inputs}
    assert judge(same).verdict == "pass" and judge(same).smoke is None

    off = compare(outcome(matrix, TP2, {**GOOD, "weather": topic(4, 9)}), base, SCENARIO, lambda m: None)
    assert off.embedding.ok is False and judge(off).verdict == "fail"
    assert off.failure.phase == "smoke"
    assert off.failure.signature.startswith(f"embedding parity with {BASE}: weather: cosine with baseline 0.96")
    assert embedding.embedding_failure(off.embedding).signature == off.failure.signature


def test_a_baseline_whose_embedding_smoke_failed_is_no_reference(matrix):
    base = judge(outcome(matrix, BASE, embedding=EmbeddingResult(ok=False, error="embeddings request failed: x")))
    out = compare(outcome(matrix, TP2, {**GOOD, "weather": topic(4, 9)}), base, SCENARIO, lambda m: None)
    assert out.embedding.parity is None and out.failure is None


def test_summary_json_carries_the_embedding_result():
    rec = EmbeddingResult(ok=True, vectors=vectors(GOOD)[:1], cosines={"a|b": 0.5})
    again = EmbeddingResult.model_validate_json(rec.model_dump_json())
    assert again == rec and again.vectors[0].dimension == 384


def test_junit_has_an_embedding_and_a_parity_case_and_a_failed_embedding_smoke_is_a_failure(matrix):
    from xml.etree import ElementTree as ET

    from servematrix.record import RunSummary
    from servematrix.report.junit import junit_xml

    base = judge(outcome(matrix, BASE))
    off = judge(compare(outcome(matrix, TP2, {**GOOD, "weather": topic(4, 9)}), base, SCENARIO, lambda m: None))
    summary = RunSummary(matrix="m", run_dir="d", host="h", vllm_version=None, torch_version=None,
                         servematrix_version="0", started_at=now_iso(), scenarios=[base, off])
    root = ET.fromstring(junit_xml(summary).split("\n", 1)[1])
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {(BASE, "load"), (TP2, "load"), (BASE, "embedding"), (TP2, "embedding"), (TP2, "parity")}
    assert cases[(TP2, "parity")].find("failure").get("message").startswith("weather: cosine with baseline")
    assert cases[(BASE, "embedding")].find("failure") is None and root.get("failures") == "1"


# --- the request ---------------------------------------------------------------------------------------
class _Embeddings(BaseHTTPRequestHandler):
    table: dict = GOOD
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # /health, for the pipeline's server lifecycle
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Embeddings.seen.append((self.path, body))
        if self.path != "/v1/embeddings":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        by_text = {x.text: self.table[x.name] for x in SPEC.inputs}
        data = [{"object": "embedding", "index": i, "embedding": by_text[t]} for i, t in enumerate(body["input"])]
        payload = json.dumps({"object": "list", "data": data[::-1], "model": body["model"],  # any order: by index
                              "usage": {"prompt_tokens": 5, "total_tokens": 5}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Embeddings)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Embeddings.seen = []
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_run_embedding_smoke_sends_every_input_in_one_float_request_and_judges_the_vectors(server):
    res = embedding.run_embedding_smoke(server, "all-minilm-l6-v2", SCENARIO.smoke)
    assert res.ok and res.error is None and [v.name for v in res.vectors] == [x.name for x in SPEC.inputs]
    assert res.vectors[0].vector == pytest.approx(GOOD["cat-mat"]) and res.vectors[0].norm == pytest.approx(1)
    [(path, body)] = _Embeddings.seen
    assert path == "/v1/embeddings" and body["encoding_format"] == "float"
    assert body["input"] == [x.text for x in SPEC.inputs]


def test_a_refused_connection_is_a_transport_error_the_failure_says():
    res = embedding.run_embedding_smoke("http://127.0.0.1:9", "m", SCENARIO.smoke)
    assert not res.ok and res.error.startswith("embeddings request failed")
    f = embedding.embedding_failure(res)
    assert f.kind == "exception" and f.phase == "smoke"


# --- the pipeline: an embedding scenario gets embedding smoke, no completion smoke, no gsm8k -------------
class EmbeddingServer(ScriptedServer):
    """The scripted server's lifecycle (spawn, health, stop) answering /v1/embeddings from `table`."""

    def __init__(self, spec, table):
        super().__init__(spec)
        self.table = table

    def _spawn(self) -> None:
        self.spec.log_path.write_text("INFO starting scripted embedding server\n")
        self._httpd = ThreadingHTTPServer((self.spec.host, self.spec.port),
                                          type("Handler", (_Embeddings,), {"table": self.table}))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def run_pipeline(matrix, out, monkeypatch, table, entry_id=BASE):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(out / "cache"))
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": "0.32.0", "torch": "2.13.0"})
    monkeypatch.setattr(pipeline_mod, "resolve", lambda scenario, base_dir=None, build=True: str(out))
    phases = []
    pipe = Pipeline(matrix, RunOptions.of(out / "run", gsm8k=True).entry, lambda k, i, text: phases.append(text))
    pipe.make_server = lambda spec: EmbeddingServer(spec, table)
    _Embeddings.seen = []
    return pipe.execute(1, by_id(matrix)[entry_id], []), phases


def test_the_pipeline_runs_embedding_smoke_and_no_completion_smoke_or_gsm8k(matrix, tmp_path, monkeypatch):
    out, phases = run_pipeline(matrix, tmp_path, monkeypatch, GOOD)
    assert out.failure is None and out.load.ok
    assert out.embedding.ok and len(out.embedding.vectors) == 5 and out.embedding.cosines["cat-mat|cat-rug"] > 0.9
    assert out.smoke is None and out.gsm8k is None and out.gsm8k_error is None  # gsm8k was asked for (gsm8k=True)
    assert [path for path, _ in _Embeddings.seen] == ["/v1/embeddings"]
    assert "embedding smoke" in phases and not any("gsm8k" in p for p in phases)
    assert judge(out).verdict == "pass"


def test_vectors_that_miss_the_expectations_fail_the_entry_in_the_smoke_phase(matrix, tmp_path, monkeypatch):
    out, _ = run_pipeline(matrix, tmp_path, monkeypatch, {**GOOD, "cat-rug": topic(3, 7)})
    assert out.embedding.ok is False and out.failure.kind == "check" and out.failure.phase == "smoke"
    assert out.failure.signature.startswith("expected cos(cat-mat, cat-rug) = 0.0000 > cos(cat-mat, stocks)")
    assert judge(out).verdict == "fail"


# --- the scenario's embedding form ---------------------------------------------------------------------
def smoke(**embedding_spec):
    return {"embedding": {"inputs": [{"name": "a", "text": "x"}, {"name": "b", "text": "y"}], **embedding_spec}}


@pytest.mark.parametrize("body, where, says", [
    (smoke(closer=[{"pair": ["a", "b"], "than": ["a", "c"]}]), "smoke.embedding.closer.0.than", "no input named 'c'"),
    ({"embedding": {"inputs": [{"name": "a", "text": "x"}, {"name": "a", "text": "y"}]}},
     "smoke.embedding.inputs.1.name", "duplicate input name 'a'"),
    (smoke(dimension=0), "smoke.embedding.dimension", "greater than or equal to 1"),
    (smoke(dimension=True), "smoke.embedding.dimension", "integer"),
    (smoke(min_cosine=1.5), "smoke.embedding.min_cosine", "less than or equal to 1"),
    ({"embedding": {"inputs": [{"name": "a", "text": "x"}]}}, "smoke.embedding.inputs", "at least 2"),
    ({**smoke(), "prompts": [{"name": "p", "prompt": "hi"}]}, "smoke", "exactly one"),
    ({}, "smoke", "exactly one"),
])
def test_a_bad_embedding_smoke_is_a_config_error_at_its_field_and_line(write, body, where, says):
    from servematrix.config.scenario import Scenario
    from servematrix.config.yamlio import load_yaml, validate

    doc = {"name": "e", "model": {"path": "/m"}, "quants": {"fp32": {}}, "smoke": body}
    path = write("scenarios/e.yaml", json.dumps(doc, indent=1))  # JSON is YAML, one key per line
    with pytest.raises(ConfigError) as err:
        validate(load_yaml(path), Scenario)
    assert f": {where}: " in str(err.value) and says in str(err.value)
    assert str(err.value).startswith(f"{path}:") and str(err.value).split(":")[1].isdigit()


def test_the_shipped_scenario_validates_as_an_embedding_scenario_without_gsm8k():
    assert isinstance(SPEC, EmbeddingSmoke) and SPEC.dimension == 384 and SPEC.normalized
    assert SPEC.min_cosine == 0.999 and SCENARIO.smoke.prompts == [] and not SCENARIO.gsm8k.enabled
    assert SmokeSpec.model_validate({"prompts": [{"name": "p", "prompt": "x"}]}).embedding is None
