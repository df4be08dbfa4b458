"""Server: start a vLLM OpenAI-compatible server for one entry and own its whole lifecycle.

`Server` holds the lifecycle shared by every kind of server (start in __enter__, poll /health
while watching the process, declare a load failure the moment it dies, tear down on every path);
a kind only says how to spawn, poll and kill. Kinds are a registry of names to classes, imported
on first use like vLLM's model registry (`docker` needs the docker SDK; `local` nothing more).
Unlike vLLM's RemoteOpenAIServer the start happens in __enter__, so a failed start is still
cleaned up.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from servematrix import redact
from servematrix.config.devices import device
from servematrix.config.matrix import Entry
from servematrix.config.scenario import Scenario
from servematrix.record import Failure, LoadResult, StageFailed
from servematrix.serve import failure, process

HEALTH_INTERVAL = 0.5  # s between /health probes (as vLLM's own test server)
EXIT_POLL = 0.02  # s between process-exit checks: bounds the crash verdict latency
STOP_GRACE = 10.0  # s between SIGTERM and SIGKILL of the process group


class LaunchSpec(BaseModel):
    """Everything needed to start one server, independent of the backend."""

    model_config = ConfigDict(frozen=True)

    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)  # added to the runner's environment
    port: int
    host: str = "127.0.0.1"
    log_path: Path
    startup_timeout: float

    def model_post_init(self, _context) -> None:
        # the credentials this server is given are masked in everything this process writes from
        # now on: its log (vLLM prints its non-default args, api_key included), reports, commands
        redact.remember_launch(self.argv, self.env)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shell(self) -> str:
        """The command line as a shell takes it (environment first, sorted), secrets masked; an
        environment name that is not a variable name is refused (ConfigError)."""
        return redact.shell_command(self.argv, dict(sorted(self.env.items())))


class ServerFailed(StageFailed):
    """The server never became healthy: its load result says so, with the seconds from spawn to
    the verdict (how fast a crash is declared)."""

    def __init__(self, fail: Failure, seconds: float | None = None):
        super().__init__(fail, load=LoadResult(ok=False, error=fail,
                                               seconds=None if seconds is None else round(seconds, 2)))


def cpu_bind(ranks: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` workers: the allowed cores split evenly, '|' between
    ranks. With more ranks than cores, ranks share cores round-robin ("0|1|0"): slow, but it lets a
    2-core host run TP=3 (vLLM accepts overlapping lists)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if ranks > len(cpus):
        return "|".join(str(cpus[i % len(cpus)]) for i in range(ranks))
    per = len(cpus) // ranks
    groups = [cpus[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(_ranges(g) for g in groups)


def omp_bind(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a server or load check of `ranks` workers. One rank in a
    process that may use every core of the host: vLLM's own "auto" (it keeps a core for the front
    end, measured faster here than binding the rank to both). Several ranks, or a process confined
    to some cores (taskset, a cgroup, one CI stream's share of the host): the allowed cores split
    explicitly, so every rank stays inside them — two servers confined to different cores then
    never bind their workers to the same one."""
    confined = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    return cpu_bind(ranks) if ranks > 1 or confined else "auto"


def _ranges(cores: list[int]) -> str:
    return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"


def build_spec(entry: Entry, scenario: Scenario, model_path: str, port: int, log_path: Path,
               python: str | None = None, startup_timeout: float | None = None,
               extra_fixes: tuple[str, ...] = (), gpu_ids: list[int] | None = None) -> LaunchSpec:
    quant = scenario.quants[entry.quant]
    argv = [
        python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", scenario.model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--tensor-parallel-size", str(entry.tp),
        "--pipeline-parallel-size", str(entry.pp),
        *scenario.server.args, *quant.args,
    ]
    from servematrix.serve import envs

    profile = device(entry.device)
    env = {**profile.env, **envs.launch_env(entry.vllm), **scenario.server.env, **quant.env}
    if profile.bind_threads and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(entry.tp * entry.pp)
    if profile.uses_gpus and gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))  # this entry's share of the host
    fixes = tuple(dict.fromkeys([*entry.fixes, *extra_fixes]))
    if fixes:
        # read by servematrix's vLLM plugin in every vLLM process (API server, engine, workers)
        env["SERVEMATRIX_FIXES"] = ",".join(fixes)
        env["SERVEMATRIX_FIX_REPORT"] = str(log_path.parent / "fixes.jsonl")
    return LaunchSpec(argv=argv, env=env, port=port, log_path=log_path,
                      startup_timeout=startup_timeout or scenario.server.startup_timeout)


class Server:
    """Lifecycle shared by all backends. Use as a context manager; __enter__ returns once healthy
    or raises ServerFailed (load failure, timeout, port in use)."""

    def __init__(self, spec: LaunchSpec, settings: BaseModel | None = None):
        self.spec = spec  # `settings`: the kind's own (DockerConfig for docker), None for local
        self.started_at: float | None = None
        self.healthy_at: float | None = None
        self.exited_at: float | None = None
        self.failure: Failure | None = None

    # backend hooks --------------------------------------------------------------------------
    def _spawn(self) -> None:
        raise NotImplementedError

    def returncode(self) -> int | None:
        """None while running."""
        raise NotImplementedError

    def _terminate(self, grace: float) -> None:
        raise NotImplementedError

    # lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Server":
        if process.port_busy(self.spec.port, self.spec.host):
            raise ServerFailed(Failure.of("port-in-use", f"port {self.spec.port} is already in use"))
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn()
            self.started_at = time.monotonic()
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.returncode() is None

    def _sync_log(self) -> None:
        """Make the log file hold everything the server has written so far (backend hook)."""

    def log_text(self) -> str:
        self._sync_log()
        try:
            return self.spec.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def death(self, phase: str) -> Failure:
        """Classify why the server is gone (or failing) from its exit code and log."""
        self.failure = failure.classify_exit(self.log_text(), self.returncode(), phase)
        return self.failure

    def _wait_healthy(self) -> None:
        deadline = self.started_at + self.spec.startup_timeout
        state = wait_healthy(self.spec.base_url, self.returncode, deadline)
        if state == "exited":
            self.exited_at = time.monotonic()
            raise ServerFailed(self.death("load"), self.exited_at - self.started_at)
        if state == "timeout":
            self.failure = failure.timeout(self.spec.startup_timeout)
            raise ServerFailed(self.failure, time.monotonic() - self.started_at)
        self.healthy_at = time.monotonic()

    def stop(self) -> None:
        self._terminate(STOP_GRACE)


def wait_healthy(base_url: str, returncode: Callable[[], int | None], deadline: float) -> str:
    """Until `base_url`/health answers 200 ("healthy"), the process whose `returncode()` is None
    while it runs has exited ("exited", noticed within EXIT_POLL), or time.monotonic() passes
    `deadline` ("timeout"). The one health wait: servers, and the benchmarks' by-hand servers."""
    next_probe = time.monotonic()
    with httpx.Client(timeout=HEALTH_INTERVAL) as client:
        while True:
            if returncode() is not None:
                return "exited"
            now = time.monotonic()
            if now >= next_probe:
                next_probe = now + HEALTH_INTERVAL
                try:
                    if client.get(f"{base_url}/health").status_code == 200:
                        return "healthy"
                except httpx.HTTPError:
                    pass
            if now > deadline:
                return "timeout"
            time.sleep(EXIT_POLL)


class LocalServer(Server):
    """The server as a local child process in its own session (process group)."""

    proc: process.Child | None = None

    def _spawn(self) -> None:
        header = f"# servematrix: {self.spec.shell()}\n"  # refuses a bad environment name first
        self._log = open(self.spec.log_path, "ab", buffering=0)
        self._log.write(header.encode())
        self.proc = process.spawn(self.spec.argv, self.spec.env, self._log)

    def _sync_log(self) -> None:
        if self.proc is not None:
            self.proc.pump.drain()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _terminate(self, grace: float) -> None:
        if self.proc is None:
            return
        process.stop(self.proc, grace)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


# server kind -> "module:Class" (a kind's module is imported only when an entry uses it)
SERVER_KINDS: dict[str, str] = {
    "local": "servematrix.serve.server:LocalServer",
    "docker": "servematrix.serve.docker:DockerServer",
}


def server_factory(kind: str, settings: BaseModel | None = None) -> Callable[[LaunchSpec], Server]:
    """How to make the servers of `kind` (a name of SERVER_KINDS), each given `settings`."""
    module, _, name = SERVER_KINDS[kind].partition(":")
    cls: type[Server] = getattr(importlib.import_module(module), name)
    return lambda spec: cls(spec, settings)
