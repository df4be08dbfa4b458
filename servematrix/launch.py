"""Launch: start a vLLM OpenAI-compatible server for one entry and own its whole lifecycle.

`Server` holds the lifecycle shared by every backend (start in __enter__, poll /health while
watching the process, declare a load failure the moment it dies, tear down on every path);
a backend only says how to spawn, poll and kill. Unlike vLLM's RemoteOpenAIServer the start
happens in __enter__, so a failed start is still cleaned up.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field

from servematrix import failure
from servematrix.failure import Failure
from servematrix.matrix import Entry
from servematrix.paths import data_file
from servematrix.scenario import Scenario

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

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shell(self) -> str:
        from servematrix.redact import redact_env

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(redact_env(self.env).items()))
        return f"{env} {shlex.join(self.argv)}".strip()


class ServerFailed(Exception):
    def __init__(self, fail: Failure, seconds: float | None = None):
        self.failure, self.seconds = fail, seconds  # seconds from spawn to the verdict
        super().__init__(fail.signature)


_GIVEN: set[int] = set()  # ports handed out by this process: concurrent jobs never share one
_GIVEN_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    with _GIVEN_LOCK:
        while True:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port


def port_busy(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def device_profile(device: str) -> dict:
    profiles = yaml.safe_load(data_file("devices.yaml").read_text())
    if device not in profiles:
        raise KeyError(f"unknown device {device!r} (known: {', '.join(profiles)})")
    return profiles[device]


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
    from servematrix import envs

    profile = device_profile(entry.device)
    env = {**profile.get("env", {}), **envs.launch_env(entry.vllm), **scenario.server.env, **quant.env}
    if profile.get("bind_threads") and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(entry.tp * entry.pp) if entry.tp * entry.pp > 1 else "auto"
    if profile.get("uses_gpus") and gpu_ids:
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

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
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
        if port_busy(self.spec.port, self.spec.host):
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

    def log_text(self) -> str:
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
        next_probe = self.started_at
        with httpx.Client(timeout=HEALTH_INTERVAL) as client:
            while True:
                if self.returncode() is not None:
                    self.exited_at = time.monotonic()
                    raise ServerFailed(self.death("load"), self.exited_at - self.started_at)
                now = time.monotonic()
                if now >= next_probe:
                    next_probe = now + HEALTH_INTERVAL
                    if self._probe(client):
                        self.healthy_at = time.monotonic()
                        return
                if now > deadline:
                    self.failure = failure.timeout(self.spec.startup_timeout)
                    raise ServerFailed(self.failure, now - self.started_at)
                time.sleep(EXIT_POLL)

    def _probe(self, client: httpx.Client) -> bool:
        try:
            return client.get(f"{self.spec.base_url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self._terminate(STOP_GRACE)


class LocalServer(Server):
    """The server as a local child process in its own session (process group)."""

    proc: subprocess.Popen | None = None

    def _spawn(self) -> None:
        self._log = open(self.spec.log_path, "ab", buffering=0)
        self._log.write(f"# servematrix: {self.spec.shell()}\n".encode())
        self.proc = spawn(self.spec.argv, self.spec.env, self._log)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _terminate(self, grace: float) -> None:
        if self.proc is None:
            return
        tree = _tree(self.proc.pid)
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        kill_tree(self.proc, tree)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


def spawn(argv: list[str], env: dict[str, str], log) -> subprocess.Popen:
    """A child in its own session (process group), added `env`, output to `log`, that dies with
    this process."""
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)


def kill_tree(proc: subprocess.Popen, tree: list[psutil.Process] | None = None) -> None:
    """SIGKILL the child's process group and every process of its tree (`tree` as listed before,
    else now): a worker that called setsid has left the group. Then reap them."""
    tree = _tree(proc.pid) if tree is None else tree
    _signal_group(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the process that started it dies without tearing
    it down (a runner or Ray worker killed with SIGKILL), so no server outlives its owner."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


BACKENDS: dict[str, type[Server]] = {"local": LocalServer}
