"""Test doubles for the run stage: a scripted pipeline (what a Session drives), a scripted server
(what a Pipeline starts: a tiny OpenAI-format HTTP server on the spec's port, no vLLM), and
builders for the smoke results both produce."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from servematrix.config.matrix import Entry, Matrix, load_matrix
from servematrix.config.scenario import Scenario
from servematrix.record import EntryOutcome, Failure, Generation, PromptResult, SmokeResult
from servematrix.run.pipeline import now_iso, outcome_for
from servematrix.serve.server import LaunchSpec, Server

REPO = Path(__file__).resolve().parents[3]
VERSIONS = {"vllm": "0.32.0", "torch": "2.13.0"}


# --- matrices ------------------------------------------------------------------------------------
def matrix_file(tmp_path: Path, body: str, name: str = "unit") -> Matrix:
    """A matrix written to tmp_path whose scenarios are the repository's (and no references)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nscenario_dir: {REPO / 'scenarios'}\n"
                    f"references_dir: {tmp_path / 'no-references'}\n{body}")
    return load_matrix(path)


def by_id(matrix: Matrix) -> dict[str, Entry]:
    return {e.id: e for e in matrix.entries}


# --- smoke results ---------------------------------------------------------------------------------
def generation(ids: list[int], text: str = "4 Paris", alternatives: dict[int, int] | None = None) -> Generation:
    """Greedy token ids; each position's top logprobs hold only its own token, plus
    `alternatives[position]` (a near-tie) where given."""
    alternatives = alternatives or {}
    top = []
    for i, t in enumerate(ids):
        top.append({t: -0.1, **({alternatives[i]: -0.2} if i in alternatives else {})})
    return Generation(text=text, token_ids=list(ids), top_logprobs=top, finish_reason="length")


def smoke(scenario: Scenario, ids: list[int] = (5, 6, 7), *, ok: bool = True, per_prompt: dict | None = None,
          alternatives: dict[int, int] | None = None) -> SmokeResult:
    """A smoke result over every prompt of `scenario`, each generating `ids` (or per_prompt[name])."""
    per_prompt = per_prompt or {}
    prompts = []
    for p in scenario.smoke.prompts:
        g = generation(list(per_prompt.get(p.name, ids)), alternatives=alternatives)
        prompts.append(PromptResult(name=p.name, endpoint="chat" if p.messages else "completions", ok=ok,
                                    text=g.text, problems=[] if ok else ["empty completion"], generation=g))
    return SmokeResult(ok=ok, prompts=prompts)


def passed(entry: Entry, scenario: Scenario, ids: list[int] = (5, 6, 7), **fields) -> EntryOutcome:
    """What a pipeline returns for an entry whose server served and whose smoke passed."""
    fields.setdefault("smoke", smoke(scenario, ids))
    return outcome_for(entry, model=scenario.model_name, started_at=now_iso(), seconds=1.0,
                       vllm_version=VERSIONS["vllm"], torch_version=VERSIONS["torch"], **fields)


def failed(entry: Entry, scenario: Scenario, failure: Failure, **fields) -> EntryOutcome:
    return outcome_for(entry, model=scenario.model_name, started_at=now_iso(), seconds=1.0, failure=failure,
                       **fields)


# --- the pipeline a Session drives -----------------------------------------------------------------
Script = Callable[[Entry, list[int]], EntryOutcome]


class ScriptedPipeline:
    """Stands in for run.pipeline.Pipeline: `execute` returns what `script[entry.id]` makes (a pass
    by default) and records the order and GPUs it was called with."""

    def __init__(self, matrix: Matrix, script: dict[str, Script] | None = None):
        self.matrix, self.script = matrix, script or {}
        self.live: set = set()
        self.calls: list[tuple[int, str, list[int]]] = []
        self.closed = False
        self._lock = threading.Lock()

    def versions(self, name: str) -> dict:
        return dict(VERSIONS)

    def execute(self, k: int, entry: Entry, gpu_ids: list[int], host_gpus=None) -> EntryOutcome:
        with self._lock:
            self.calls.append((k, entry.id, list(gpu_ids)))
        scenario = self.matrix.scenario(entry.scenario)
        make = self.script.get(entry.id, lambda e, ids: passed(e, scenario))
        return make(entry, gpu_ids)

    def close(self) -> None:
        self.closed = True

    @property
    def executed(self) -> list[str]:
        return [entry_id for _, entry_id, _ in self.calls]


class StoppableServer:
    """A live server as the session's canceller sees it: stop() is all it calls."""

    def __init__(self):
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()


# --- the server a Pipeline starts -----------------------------------------------------------------
def completion_body(model: str, ids: list[int]) -> dict:
    tokens = [f"token_id:{t}" for t in ids]
    return {
        "id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": "".join(f" t{t}" for t in ids), "finish_reason": "length",
                     "logprobs": {"tokens": tokens, "token_logprobs": [-0.1] * len(ids),
                                  "top_logprobs": [{tok: -0.1, "token_id:999": -3.0} for tok in tokens],
                                  "text_offset": list(range(len(ids)))}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": len(ids), "total_tokens": 4 + len(ids)},
    }


def chat_body(model: str, ids: list[int]) -> dict:
    content = [{"token": f"token_id:{t}", "logprob": -0.1, "bytes": None,
                "top_logprobs": [{"token": f"token_id:{t}", "logprob": -0.1, "bytes": None},
                                 {"token": "token_id:999", "logprob": -3.0, "bytes": None}]} for t in ids]
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "length", "logprobs": {"content": content},
                     "message": {"role": "assistant", "content": "".join(f" t{t}" for t in ids)}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": len(ids), "total_tokens": 4 + len(ids)},
    }


DROP = object()  # a reply that closes the connection without answering (a transport error)


class ScriptedServer(Server):
    """A Server whose "process" is an HTTP thread on spec.port. `reply(server, path, body)` answers
    each generation request: a JSON dict, or DROP; by default `ids` are generated. `die_on_load`:
    the process exits with code 1 at spawn, that text in its log. `healthy`: whether /health says 200."""

    def __init__(self, spec: LaunchSpec, *, ids: list[int] = (5, 6, 7), reply=None, die_on_load: str | None = None,
                 healthy: bool = True):
        super().__init__(spec)
        self.ids, self.reply, self.die_on_load, self.healthy = list(ids), reply, die_on_load, healthy
        self.code: int | None = None
        self.requests: list[str] = []
        self.stopped = False
        self._httpd: ThreadingHTTPServer | None = None

    # backend hooks
    def _spawn(self) -> None:
        self.spec.log_path.write_text("INFO starting scripted server\n")
        if self.die_on_load is not None:
            self.log(self.die_on_load)
            self.code = 1
            return
        self._httpd = _QuietServer((self.spec.host, self.spec.port), _handler(self))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def returncode(self) -> int | None:
        return self.code

    def _terminate(self, grace: float) -> None:
        self.stopped = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.code is None:
            self.code = -15

    # what a script may do
    def log(self, text: str) -> None:
        with open(self.spec.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def die(self, log_line: str, after: float = 0.0, code: int = 1) -> None:
        """The process writes `log_line` and exits `after` seconds from now."""

        def later():
            time.sleep(after)
            self.log(log_line)
            self.code = code

        threading.Thread(target=later, daemon=True).start()

    def answer(self, path: str, body: dict):
        self.requests.append(path)
        if self.reply is not None:
            return self.reply(self, path, body)
        return (chat_body if path.endswith("chat/completions") else completion_body)(body.get("model"), self.ids)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-reply (a stopped smoke) is part of the script


def _handler(server: ScriptedServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200 if server.healthy else 503)
            else:
                self._send(404)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._send(404)
                return
            out = server.answer(self.path, body)
            if out is DROP:
                self.close_connection = True
                return  # nothing written: the client sees the connection closed mid-request
            self._send(200, out)

    return Handler
