"""Launch: start a vLLM OpenAI-compatible server for one entry and own its whole lifecycle.

`Server` holds the lifecycle shared by every backend (start in __enter__, poll /health while
watching the process, declare a load failure the moment it dies, tear down on every path);
a backend only says how to spawn, poll and kill. Unlike vLLM's RemoteOpenAIServer the start
happens in __enter__, so a failed start is still cleaned up.
"""

from __future__ import annotations

import os
import select
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

from servematrix import redact

from servematrix.serve import failure
from servematrix.serve.failure import Failure
from servematrix.config.matrix import Entry
from servematrix.paths import data_file
from servematrix.config.scenario import Scenario

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
    from servematrix.serve import envs

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

    proc: Child | None = None

    def _spawn(self) -> None:
        header = f"# servematrix: {self.spec.shell()}\n"  # refuses a bad environment name first
        self._log = open(self.spec.log_path, "ab", buffering=0)
        self._log.write(header.encode())
        self.proc = spawn(self.spec.argv, self.spec.env, self._log)

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
        tree = _tree(self.proc.pid)
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        kill_tree(self.proc, tree)
        self.proc.pump.close()  # every writer is dead: the pipe ends at once
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


class LogPump:
    """A child's output (stdout and stderr on one pipe) copied into its log file, redacted line by
    line, by a thread: no secret the child prints (vLLM logs its api_key among its non-default
    args) reaches the file.

    `drain()` makes the file hold everything written so far, in the caller's thread and at once
    (no waiting for the pipe's end, which a surviving grandchild could hold open): called before
    the log is read, so the failure classifier sees the dying process's last lines. `close()`
    waits for the pipe's end (bounded), copies the rest and stops."""

    def __init__(self, pipe, log) -> None:
        self._pipe, self._fd, self._log = pipe, pipe.fileno(), log
        os.set_blocking(self._fd, False)
        self._lines = redact.LineRedactor()
        self._lock = threading.Lock()  # one copier at a time: the thread, or drain()/close()
        self._eof = self._broken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"log-pump-{self._fd}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)  # the timeout only rechecks _stop
            if ready:
                with self._lock:
                    if not self._pull():
                        return

    def _pull(self) -> bool:
        """Copy what the pipe holds now (the lock held); False at its end."""
        while not self._eof:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:  # closed under us: nothing more to read
                chunk = b""
            if chunk:
                self._copy(self._lines.feed, chunk)
            else:
                self._eof = True
                self._copy(self._lines.flush)
        return False

    def _copy(self, redacted, *chunk: bytes) -> None:
        # never let the child block on a full pipe: if redaction fails or the log cannot be
        # written, keep reading and drop the output rather than write it unredacted
        if self._broken:
            return
        try:
            data = redacted(*chunk)
            if data:
                self._log.write(data)
                self._log.flush()
        except Exception:  # noqa: BLE001 - see above
            self._broken = True

    def drain(self) -> None:
        with self._lock:
            self._pull()
            self._copy(self._lines.flush)

    def close(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join()
        self.drain()
        with self._lock:
            self._eof = True  # the fd number may be reused once closed: never read it again
            if not self._pipe.closed:
                self._pipe.close()


class Child(subprocess.Popen):
    """A spawned child; its output reaches the log through `pump`."""

    pump: LogPump


def spawn(argv: list[str], env: dict[str, str], log) -> Child:
    """A child in its own session (process group), added `env`, output redacted into `log` (a
    binary file), that dies with this process. Call `proc.pump.close()` once it is reaped."""
    proc = Child(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    proc.pump = LogPump(proc.stdout, log)
    return proc


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
