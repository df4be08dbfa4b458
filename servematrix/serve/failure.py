"""Failure classification: turn a dead or unhealthy server into a short signature
(`KeyError: 'layers.0.self_attn.qkv_proj.k_scale'`) and a kind, and tell infrastructure trouble
(port in use, OOM kill, start-up timeout) apart from a regression in vLLM or the checkpoint. Also
what a log line says beyond that (when it was logged, whether it is an error or a warning, an HTTP
status, the shutdown), for the reports' excerpt of a server that stayed up but answered wrong."""

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
    # vLLM inspects a model class in a subprocess (model_executor/models/registry.py) and re-raises
    # whatever stopped it as these two (then as ModelConfig's ValidationError, which comes after the
    # cause): the cause is the subprocess's own exception, logged between them
    "'vllm.model_executor.models.registry']' returned non-zero exit status",
    "RuntimeError: Error raised in subprocess",
)
# when a line was logged, as "MM-DD HH:MM:SS" (orders within a year): vLLM's logger, torch's c10
# warnings ("[W1201 17:23:39.88 utils.cpp:68]") and lm-eval's ("2026-12-01:17:24:14 INFO")
_VLLM_TIME = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d\d-\d\d) (\d\d:\d\d:\d\d) \[")
_TORCH_TIME = re.compile(r"^\[[IWEF](\d\d)(\d\d) (\d\d:\d\d:\d\d)")
_LM_EVAL_TIME = re.compile(r"^\d{4}-(\d\d-\d\d):(\d\d:\d\d:\d\d) ")
# an error or a warning: vLLM's logger at WARNING and above, torch's W/E/F, uvicorn's, a Python
# warning or traceback, an exception line
_PROBLEM = re.compile(r"(?:^|\) )(?:\x1b\[[0-9;]*m)*(?:WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \["
                      r"|^\[[WEF]\d{4} |^(?:WARNING|ERROR|CRITICAL):\s|\b[A-Z]\w*Warning: "
                      r"|Traceback \(most recent call last\)")
_HTTP = re.compile(r'"(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) \S+ HTTP/[\d.]+" (\d{3})')
_SHUTDOWN = re.compile(r"\[shutdown\]|^INFO:\s+Shutting down")
# the level of a line vLLM's logger wrote: its formatter (logging_utils/formatter.py NewLineFormatter)
# repeats the header on every line of a record, the traceback of `logger.warning(..., exc_info=e)`
# included, so an exception line carries the level of the record that printed it
_LEVEL = re.compile(r"(?:^|\) )(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OOM = re.compile(r"OutOfMemoryError|out of memory|Cannot allocate memory|MemoryError", re.I)
_PORT = re.compile(r"Address already in use|\[Errno 98\]")


def strip_prefix(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\n")).strip()


def exception_lines(log: str) -> list[str]:
    """Exception lines (`Name: message`) in order; an AssertionError gets the `assert` source line
    that Python prints above it, since the bare name says nothing."""
    return [line for line, _ in _exceptions(log)]


def _exceptions(log: str) -> list[tuple[str, bool]]:
    """Each exception line with whether it was handled: logged by vLLM below ERROR (a traceback
    that `logger.warning(..., exc_info=e)` prints while vLLM carries on with a default)."""
    out: list[tuple[str, bool]] = []
    previous = ""
    for raw in log.splitlines():
        line = strip_prefix(raw)
        m = _EXC.match(line)
        if m:
            if m.group("name").endswith("AssertionError") and not m.group("msg") and previous.startswith("assert"):
                line = f"AssertionError: {previous}"
            level = _LEVEL.search(_ANSI.sub("", raw))
            out.append((line, bool(level) and level.group(1) in ("DEBUG", "INFO", "WARNING")))
        if line and not set(line) <= set("^~ "):  # skip the caret line under the source
            previous = line
    return out


def root_exception(log: str) -> str | None:
    """The exception that ended the process: the first one raised, before vLLM's wrappers of it
    and before exceptions it logged as warnings and got past (those explain nothing that
    failed; one logged first would name the wrong cause)."""
    found = _exceptions(log)
    real = [(ln, handled) for ln, handled in found if not any(w in ln for w in _WRAPPERS)]
    ranked = [ln for ln, handled in real if not handled] or [ln for ln, _ in real] or [ln for ln, _ in found]
    return ranked[0][:400] if ranked else None


def logged_at(line: str) -> str | None:
    """When a vLLM, torch or lm-eval log line was written ("MM-DD HH:MM:SS"), None if it says not."""
    m = _VLLM_TIME.search(line) or _LM_EVAL_TIME.match(line)
    if m:
        return f"{m.group(1)} {m.group(2)}"
    m = _TORCH_TIME.match(line)
    return f"{m.group(1)}-{m.group(2)} {m.group(3)}" if m else None


def is_problem(line: str) -> bool:
    """Whether a server log line is an error or a warning (or an exception's)."""
    return bool(_PROBLEM.search(line)) or bool(_EXC.match(strip_prefix(line)))


def http_status(line: str) -> int | None:
    """The status of an HTTP response the server logged (uvicorn's access line), else None."""
    m = _HTTP.search(line)
    return int(m.group(1)) if m else None


def shutting_down(line: str) -> bool:
    """Whether the server is stopping here (what follows is its teardown, not its serving)."""
    return bool(_SHUTDOWN.search(line))


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
