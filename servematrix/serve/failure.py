"""Failure classification: turn a dead or unhealthy server into a short signature
(`KeyError: 'layers.0.self_attn.qkv_proj.k_scale'`) and a kind, and tell infrastructure trouble
(port in use, OOM kill, start-up timeout) apart from a regression in vLLM or the checkpoint."""

from __future__ import annotations

import re
import signal

from servematrix.record import Failure


# vLLM prefixes worker output with "(EngineCore_DP0 pid=123)" or "(Worker_TP1 pid=9)"
# and its logger with "ERROR 11-22 12:46:11 [multiproc_executor.py:953] "
_PREFIX = re.compile(
    r"^(?:\x1b\[[0-9;]*m)*(?:\([\w.\-]+ pid=\d+\))?(?:\x1b\[[0-9;]*m)*\s*"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ?)?"
)
_EXC = re.compile(
    r"^(?P<name>(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)|KeyError|StopIteration)"
    r"(?::\s*(?P<msg>.*))?$"
)
# Wrappers that vLLM raises after the real root cause; never the signature when another exists.
_WRAPPERS = (
    "Engine core initialization failed",
    "See root cause above",
    "EngineDeadError",
    "EngineCore encountered an issue",
    "Worker failed with error",
    "WorkerProc initialization failed",
)
_OOM = re.compile(r"OutOfMemoryError|out of memory|Cannot allocate memory|MemoryError", re.I)
_PORT = re.compile(r"Address already in use|\[Errno 98\]")


def strip_prefix(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\n")).strip()


def exception_lines(log: str) -> list[str]:
    """Exception lines (`Name: message`) in order; an AssertionError gets the `assert` source line
    that Python prints above it, since the bare name says nothing."""
    out: list[str] = []
    previous = ""
    for raw in log.splitlines():
        line = strip_prefix(raw)
        m = _EXC.match(line)
        if m:
            if m.group("name").endswith("AssertionError") and not m.group("msg") and previous.startswith("assert"):
                line = f"AssertionError: {previous}"
            out.append(line)
        if line and not set(line) <= set("^~ "):  # skip the caret line under the source
            previous = line
    return out


def root_exception(log: str) -> str | None:
    lines = exception_lines(log)
    real = [ln for ln in lines if not any(w in ln for w in _WRAPPERS)]
    chosen = (real or lines)
    return chosen[0][:400] if chosen else None


def classify_exit(log: str, returncode: int | None, phase: str = "load") -> Failure:
    """Why a server process ended (or why its requests failed)."""
    if _PORT.search(log):
        return Failure.of("port-in-use", "OSError: [Errno 98] Address already in use", phase)
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        # vLLM never SIGKILLs its own API server: the OOM killer or an operator did. What its
        # orphaned workers log after that (broken pipes) is not the cause.
        return Failure.of("oom", "killed by SIGKILL (OOM killer or operator)", phase)
    if _OOM.search(log):
        line = next((strip_prefix(ln) for ln in log.splitlines() if _OOM.search(ln)), "out of memory")
        return Failure.of("oom", line[:400], phase)
    exc = root_exception(log)
    if exc:
        return Failure.of("exception", exc, phase)
    if returncode is not None and returncode < 0:
        return Failure.of("signal", f"killed by {signal.Signals(-returncode).name}", phase)
    return Failure.of("exit", f"exited with code {returncode}" if returncode is not None else "no exception in log", phase)


def timeout(seconds: float, phase: str = "load") -> Failure:
    return Failure.of("timeout", f"not healthy after {seconds:.0f} s (start-up timeout)", phase)
