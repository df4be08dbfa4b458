"""Pipeline: one matrix entry into one outcome, the same wherever it runs (this host's pool or a
Ray task). Phases in order — checkpoint → server (or load check) → smoke → gsm8k → accuracy — each
returns its typed result or raises StageFailed; `_run` is the one place an exception becomes the
entry's Failure. The verdict is not decided here: the session compares the outcome with its
baseline's record first, then check.verdict.judge decides it once.

Like pytest's phase flow: each phase goes through one wrapper (`_phase`: progress line, result
kept in `Parts`), and what the phases produced is only read, never rewritten, by later stages."""

from __future__ import annotations

import contextlib
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from servematrix.check import accuracy, gsm8k
from servematrix.check.embedding import embedding_failure, run_embedding_smoke
from servematrix.check.smoke import run_smoke, smoke_failure
from servematrix.checkpoint.resolve import ModelUnavailable, resolve
from servematrix.config import plan
from servematrix.config.devices import device
from servematrix.config.matrix import Entry, Matrix
from servematrix.config.scenario import Scenario, SmokeSpec
from servematrix.record import (CheckResult, EmbeddingResult, EntryOutcome, Expected, Failure, FixRecord, Gsm8kResult,
                                LoadCheckResult, LoadResult, MetricValue, SmokeResult, StageFailed)
from servematrix.run.options import EntryOptions
from servematrix.serve import envs, hardware, loadcheck, process
from servematrix.serve.server import LaunchSpec, Server, build_spec, server_factory
from servematrix.serve.world import Worlds

DEATH_GRACE = 5.0  # s to let a server that failed a request finish dying, so its log names the cause


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def outcome_for(entry: Entry, **fields) -> EntryOutcome:
    """An outcome carrying the entry's identity and expectation."""
    return EntryOutcome(id=entry.id, scenario=entry.scenario, tp=entry.tp, pp=entry.pp, quant=entry.quant,
                        vllm=entry.vllm, device=entry.device, tags=list(entry.tags),
                        expect=Expected.model_validate(entry.expectation),
                        enabled_fixes=list(entry.fixes), **fields)


def skipped(entry: Entry, scenario: Scenario, why: str) -> EntryOutcome:
    return outcome_for(entry, model=scenario.model_name, skipped=why, started_at=now_iso(), seconds=0.0)


def interrupted() -> Failure:
    return Failure.of("interrupted", "run interrupted (Ctrl-C / SIGTERM)", "run")


def with_retries(attempt: Callable[[int], EntryOutcome], retries: int, cancelled: threading.Event | None = None,
                 retrying: Callable[[Failure], None] = lambda f: None) -> EntryOutcome:
    """`attempt(n)` until it ends without an infrastructure failure (a crash of the host's doing:
    OOM, a timeout, a busy port), at most `retries` times more; a model that cannot be had and an
    interrupt are never retried. A matrix entry's attempts and a sweep cell's."""
    n = 1
    while True:
        out = attempt(n)
        f = out.failure
        retryable = f is not None and f.infra and f.kind not in {"interrupted", "model"}
        if not retryable or n > retries or (cancelled is not None and cancelled.is_set()):
            return out
        n += 1
        retrying(f)


@dataclass
class Parts:
    """The typed results of one attempt, as the phases produce them (record fields by name)."""

    model: str
    node: str = field(default_factory=platform.node)
    vllm_version: str | None = None
    torch_version: str | None = None
    server_command: str | None = None
    load: LoadResult | None = None
    load_check: LoadCheckResult | None = None
    smoke: SmokeResult | None = None
    embedding: EmbeddingResult | None = None
    gsm8k: Gsm8kResult | None = None
    gsm8k_error: str | None = None
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    accuracy: list[CheckResult] = field(default_factory=list)
    fixes: list[FixRecord] = field(default_factory=list)


class Pipeline:
    """Runs entries of `matrix` with `options`. `phase(k, id, text)` hears each phase; `cancelled`
    set (Ctrl-C in a threaded pool) makes the current attempt end as interrupted; `live` holds the
    servers up now, so a canceller can stop them."""

    def __init__(self, matrix: Matrix, options: EntryOptions, phase: Callable[[int, str, str], None] | None = None,
                 cancelled: threading.Event | None = None):
        self.matrix, self.options = matrix, options
        self.python = options.python or sys.executable
        self.make_server = server_factory(options.server_kind, options.docker)
        self.phase = phase or (lambda k, entry_id, text: None)
        self.cancelled = cancelled or threading.Event()
        self.live: set[Server] = set()
        self._versions: dict[str, dict] = {}  # vLLM environment -> its versions
        self._lock = threading.Lock()
        self.worlds = Worlds(options.out_dir / ".worlds")  # load checks' persistent workers: close() ends them

    def close(self) -> None:
        """End what the entries left running for the next ones (the load checks' worlds)."""
        self.worlds.close()

    def versions(self, name: str) -> dict:
        with self._lock:
            if name not in self._versions:
                self._versions[name] = envs.versions(name, self.python)
            return self._versions[name]

    # ------------------------------------------------------------------------------------------
    def execute(self, k: int, entry: Entry, gpu_ids: list[int],
                host_gpus: list[hardware.Gpu] | None = None) -> EntryOutcome:
        """One entry on the GPUs `gpu_ids` of this host (`host_gpus` as already probed, else probed
        here), retried on an infrastructure failure; never raises for a scenario's fault."""
        scenario = self.matrix.scenario(entry.scenario)
        if gpu_ids:
            gpus = host_gpus if host_gpus is not None else hardware.probe_gpus()
            why = hardware.unmet(len(gpu_ids), scenario.requirements(entry.quant),
                                 [g for g in gpus if g.index in gpu_ids])
            if why is not None:
                return skipped(entry, scenario, why)
        return with_retries(lambda attempt: self._run(k, entry, scenario, attempt, gpu_ids), self.options.retries,
                            self.cancelled, lambda f: self.phase(k, entry.id, f"infrastructure failure ({f.kind}), retrying"))

    def _run(self, k: int, entry: Entry, scenario: Scenario, attempt: int, gpu_ids: list[int]) -> EntryOutcome:
        started, t0 = now_iso(), time.monotonic()
        entry_dir = self.options.out_dir / entry.id
        parts = Parts(model=scenario.model_name)
        failure: Failure | None = None
        try:
            entry_dir.mkdir(parents=True, exist_ok=True)  # a full disk costs this entry, not the run
            (entry_dir / "fixes.jsonl").unlink(missing_ok=True)
            self._phases(k, entry, scenario, entry_dir, gpu_ids, parts)
        except StageFailed as exc:
            failure = exc.failure
            for name, value in exc.recorded.items():
                setattr(parts, name, value)
        except ModelUnavailable as exc:
            failure = Failure.of("model", str(exc), "load")
        except envs.EnvError as exc:
            failure = Failure.of("tool", f"vLLM environment: {exc}"[:400], "load")
        except KeyboardInterrupt:
            failure = interrupted()
        except Exception as exc:  # noqa: BLE001 - a servematrix bug must cost one scenario, not the run
            failure = Failure.of("tool", f"servematrix: {type(exc).__name__}: {exc}"[:400], "run")
        if self.cancelled.is_set():  # the pool stopped this server on Ctrl-C
            failure = interrupted()
        parts.fixes = read_fix_report(entry_dir / "fixes.jsonl")
        return outcome_for(entry, **vars(parts), failure=failure, started_at=started,
                           seconds=round(time.monotonic() - t0, 2), attempts=attempt)

    def _phases(self, k: int, entry: Entry, scenario: Scenario, entry_dir: Path, gpu_ids: list[int],
                parts: Parts) -> None:
        python = self._server_python(k, entry)
        versions = self.versions(entry.vllm)
        parts.vllm_version, parts.torch_version = versions.get("vllm"), versions.get("torch")
        self.phase(k, entry.id, "resolving model")
        model_path = resolve(scenario, self.matrix.store.directory)
        spec = build_spec(entry, scenario, model_path, process.free_port(), entry_dir / "server.log", python,
                          plan.startup_timeout(self.options.startup_timeout, self.matrix.spec.startup_timeout, scenario),
                          self.options.inject, gpu_ids)
        parts.server_command = spec.shell()
        # a release this host can only load-check (the CUDA wheel on a CPU host): the load check, with why
        not_served = envs.not_served(entry.vllm)
        if scenario.load_check_on(entry.device) or not_served:
            self.phase(k, entry.id, "load check (vLLM's loader under the layout; no server"
                       + (f": {not_served})" if not_served else ")"))
            self._load_check(entry, scenario, spec, entry_dir, parts, not_served)
            return
        self.phase(k, entry.id, "starting server")
        with started(self.make_server, spec, parts, self.live) as server:
            self._serve(k, entry, scenario, spec, server, model_path, entry_dir, parts)
        if parts.gsm8k is not None:
            self._accuracy(entry, scenario, parts)

    def _server_python(self, k: int, entry: Entry) -> str:
        """The interpreter of the entry's vLLM release, building its environment on first use."""
        if entry.vllm == envs.CURRENT:
            return self.python
        if envs.info(entry.vllm) is None:
            self.phase(k, entry.id, f"preparing vLLM environment {entry.vllm}")
        envs.ensure(entry.vllm)
        return envs.python(entry.vllm)

    def _load_check(self, entry: Entry, scenario: Scenario, spec: LaunchSpec, entry_dir: Path, parts: Parts,
                    not_served: str | None = None) -> None:
        """Always on this host in the entry's vLLM environment, whatever the server kind: in the
        release's persistent world (vLLM imported once per run and release, each check's ranks
        forked from it), the same result a process of its own would give (serve/world.py)."""
        profile = device(entry.device)
        attention = profile.attention()
        loads = scenario.load_check.loads_weights if scenario.load_check is not None else True
        check = loadcheck.Check(attention=attention, load_weights=loads, out=entry_dir / "loadcheck")
        # the world starts with what every check of the release shares (vLLM reads it at import);
        # each check's own variables (its fixes, thread binding) reach only its forked ranks
        world_env = {**profile.env, **envs.launch_env(entry.vllm)}
        try:
            result = load_check_phase(self.worlds, f"{entry.vllm}-{entry.device}", spec, check, world_env, parts)
        except StageFailed as exc:
            if not_served and exc.recorded.get("load_check") is not None:
                exc.recorded["load_check"] = exc.recorded["load_check"].model_copy(update={"not_served": not_served})
            raise
        parts.load_check = result.model_copy(update={"not_served": not_served})

    def _serve(self, k: int, entry: Entry, scenario: Scenario, spec: LaunchSpec, server: Server, model_path: str,
               entry_dir: Path, parts: Parts) -> None:
        """Smoke, then gsm8k, against the healthy server (a pooling model: embedding smoke, and no
        gsm8k); a request that fails because the server died is that death (its log names the
        cause), classified once it has finished dying."""
        if scenario.smoke.embedding is not None:  # a pooling model: vectors, and no text to grade
            self.phase(k, entry.id, "embedding smoke")
            embedding_phase(server, spec, scenario.model_name, scenario.smoke, parts)
            return
        self.phase(k, entry.id, "smoke")
        try:
            smoke_phase(server, spec, scenario.model_name, scenario.smoke, parts)
        except StageFailed:
            parts.gsm8k_error = "skipped: smoke failed"
            raise
        if not plan.gsm8k_runs(self.options.gsm8k, self.matrix.spec.gsm8k.enabled, scenario):
            return
        limit = self.matrix.gsm8k_limit(scenario, self.options.gsm8k_limit)
        self.phase(k, entry.id, f"gsm8k (limit {limit or 'all'})")
        tokenizer = model_path if scenario.gsm8k.nll else None
        try:
            # lm-eval runs in the session's environment, whatever vLLM the server runs
            parts.gsm8k = gsm8k.run(spec.base_url, scenario.model_name, scenario.gsm8k, limit, entry_dir / "gsm8k",
                                    server.alive, self.python, tokenizer)
        except StageFailed as exc:
            died = None if server.alive() else server.death("gsm8k")
            raise StageFailed(died or exc.failure, **exc.recorded) from exc

    def _accuracy(self, entry: Entry, scenario: Scenario, parts: Parts) -> None:
        g = parts.gsm8k
        metrics = accuracy.gsm8k_metrics(g.strict, g.flexible, g.n)
        # the per-question NLLs gsm8k.parse already computed (the paired tests use the same values)
        nll = [q.nll for q in g.questions if q.nll is not None]
        if nll:
            metrics["gsm8k.nll"] = accuracy.value_metric(nll)
        parts.metrics = metrics
        vllm = parts.vllm_version or self.versions(envs.CURRENT).get("vllm")
        parts.accuracy = [accuracy.judge(c, metrics.get(c.metric),
                                         self.matrix.references.find(c.metric, entry.scenario, entry.quant, entry.tp,
                                                                     entry.pp, entry.device, vllm), g.protocol)
                          for c in scenario.accuracy.checks]
        failed = [r for r in parts.accuracy if r.status == "fail"]
        if failed:
            raise StageFailed(Failure.of("check", failed[0].summary()[:400], "accuracy"))


def load_check_phase(worlds: Worlds | None, key: str, spec: LaunchSpec, check: loadcheck.Check,
                     world_env: dict[str, str], parts: Parts) -> LoadCheckResult:
    """The load-check phase (vLLM's construction and load_weights under the layout, no server)
    into `parts`: in `key`'s persistent world of the pool, started with `world_env` (serve/world.py),
    or with no pool in a process of its own (loadcheck.run: the same result); StageFailed when it
    failed. A matrix entry's load check and a sweep cell's."""
    parts.server_command = loadcheck.shell(spec, check)
    result = loadcheck.run(spec, check) if worlds is None else worlds.check(key, spec, check, world_env)
    parts.load_check, parts.load = result, LoadResult(ok=True, seconds=result.seconds)
    return result


@contextlib.contextmanager
def started(make_server: Callable[[LaunchSpec], Server], spec: LaunchSpec, parts: Parts,
            live: set[Server] | None = None) -> Iterator[Server]:
    """The server phase: a server started on `spec` (StageFailed when it never becomes healthy),
    its start-up time into `parts.load`, held in `live` while up (a canceller stops what is
    there), stopped on every path. A matrix entry's server and a sweep cell's (`--depth serve`)."""
    live = live if live is not None else set()
    server = make_server(spec)
    live.add(server)
    try:
        with server:
            parts.load = LoadResult(ok=True, seconds=round(server.healthy_at - server.started_at, 2))
            yield server
    finally:
        live.discard(server)


def smoke_phase(server: Server, spec: LaunchSpec, model_name: str, smoke: SmokeSpec, parts: Parts) -> None:
    """The smoke phase against a healthy server, into `parts.smoke`; StageFailed when it failed,
    with the server's own death as the failure where a request failed because the server died."""
    parts.smoke = run_smoke(spec.base_url, model_name, smoke)
    failed = smoke_failure(parts.smoke)
    if failed is not None:  # a request that failed in transport is most likely the server dying
        raise StageFailed((parts.smoke.error and _died(server)) or failed)


def embedding_phase(server: Server, spec: LaunchSpec, model_name: str, smoke: SmokeSpec, parts: Parts) -> None:
    """A pooling model's smoke phase (/v1/embeddings) against a healthy server, into
    `parts.embedding`; StageFailed as smoke_phase. A matrix entry's and a sweep cell's."""
    parts.embedding = run_embedding_smoke(spec.base_url, model_name, smoke)
    failed = embedding_failure(parts.embedding)
    if failed is not None:
        raise StageFailed((parts.embedding.error and _died(server)) or failed)


def _died(server: Server) -> Failure | None:
    """The server's death, if a failed request was its doing (given DEATH_GRACE to finish dying)."""
    deadline = time.monotonic() + DEATH_GRACE
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return None if server.alive() else server.death("smoke")


def read_fix_report(path: Path) -> list[FixRecord]:
    """What each vLLM process said its fix modules did (one JSON line per process and fix)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(FixRecord.model_validate_json(line))
        except ValueError:
            continue  # a line cut short by a killed process
    return out
