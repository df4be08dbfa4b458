"""Processes: how servematrix starts and ends every child it runs (vLLM servers, load checks,
lm-eval): in its own session (process group), under the reaper (`reaper.py`: the tree dies with its
owner, even one killed by SIGKILL), its output redacted into a log by a pump thread; ended by
SIGTERM to the group, a grace period, then SIGKILL of the whole tree (a worker that called setsid
has left the group). One rule for every child. Linux only (the reaper uses prctl and /proc)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from servematrix import redact

POLL = 0.02  # s between checks of a killed tree
REAPER = str(Path(__file__).with_name("reaper.py"))

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



class Child(subprocess.Popen):
    """A spawned child; its output reaches the log through `pump`."""

    pump: LogPump



def spawn(argv: list[str], env: dict[str, str], log) -> Child:
    """A child in its own session (process group), added `env`, output redacted into `log` (a
    binary file), that dies with this process: it runs under the reaper, which kills its whole
    tree when this process dies, however (SIGKILL included), and otherwise exits as the child does
    (its pid is the reaper's; the child and its tree are in the reaper's group). A missing
    executable raises FileNotFoundError here, as Popen would. Call `proc.pump.close()` once it is
    reaped."""
    env = {**os.environ, **env}
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    # -I -S: the reaper imports nothing of servematrix or site-packages (milliseconds to start)
    wrapped = [sys.executable, "-I", "-S", REAPER, str(os.getpid()), *argv]
    proc = Child(wrapped, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 stdin=subprocess.DEVNULL, start_new_session=True)
    proc.pump = LogPump(proc.stdout, log)
    return proc



def stop(proc: "Child", grace: float) -> None:
    """End a child started by `spawn`: SIGTERM to its group, up to `grace` s to exit, then SIGKILL
    of every process of its tree (listed before the SIGTERM: orphans re-parent), then its log's
    pump finishes (every writer is dead: the pipe ends at once)."""
    tree = _tree(proc.pid)
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    kill_tree(proc, tree)
    proc.pump.close()



REAP_WAIT = 30.0  # s for a SIGKILLed tree to be gone (milliseconds on a quiet host)


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
    _wait_dead(tree, timeout=REAP_WAIT)
    try:
        proc.wait(timeout=REAP_WAIT)
    except subprocess.TimeoutExpired:
        # SIGKILLed, yet not gone (a process in uninterruptible I/O on a host loaded to 30+ ends
        # when the kernel lets it): it can no longer serve or load anything, and Popen reaps it at
        # its next poll. A stop must not turn that wait into the run's internal error (a sweep of
        # 0.34.0 died so, with 54 cells unrun).
        pass



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



def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until every process is gone or a zombie. A killed grandchild is re-parented to PID 1 and
    stays a zombie until PID 1 reaps it (1.4 s after SIGKILL on this host): psutil.wait_procs waits
    for that reaping, which is not ours to wait for (a zombie holds no port, memory or file)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if _running(p)]
        if pending:
            time.sleep(POLL)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
