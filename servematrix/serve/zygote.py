"""The persistent load-check worker, for the sweep's cells and a run's load-check entries: runs
inside a release's vLLM environment (stdlib, torch and vLLM only; started with `python -P`), pays
vLLM's imports once, then serves load checks one after another, each in fresh processes forked
from this one.

Why fork: a load check must start from a clean vLLM (no model, no process group, no patched
platform, no fix module from the previous cell) and a crash of one cell must not take the next.
A forked rank inherits the imported modules (the ~10 s a process per check pays) but nothing a
check did, because no check runs in this process; whatever a rank leaks dies with it. A world of
TP×PP ranks is TP×PP forks of this process joined in a gloo group, as the one-process-per-check
worker (serve/loadcheck_worker.py) spawns them; each rank runs that worker's `_rank`, unchanged.

Protocol (files, so the runner's one spawn/stop rule applies to this process like any child):
the runner writes DIR/request-<n>.json {"argv": worker argv, "log": path, "env": {...}}; this
process writes DIR/ready.json once imported and DIR/response-<n>.json {"codes": [...], "seconds"}
after each check. A rank that fails ends its world: its peers would wait on it in gloo forever.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # `python -P` left this folder off the path
import loadcheck_worker as lw  # noqa: E402 - the rank code beside this file, found only once its folder is on the path

POLL = 0.01  # s between looks for the next request
PEER_GRACE = 2.0  # s a failed rank's peers get before they are killed


PREIMPORT = ("torch", "vllm.config", "vllm.distributed", "vllm.engine.arg_utils", "vllm.model_executor.model_loader",
             "vllm.model_executor.model_loader.utils", "vllm.model_executor.models", "vllm.plugins",
             "vllm.utils.torch_utils", "vllm.utils.argparse_utils")
SERVER_PARSERS = ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args")  # 0.30+: the latter


def _preimport() -> None:
    """What every check imports first; imported here once, inherited by every fork."""
    import importlib

    for name in PREIMPORT:
        importlib.import_module(name)
    for name in SERVER_PARSERS:
        try:
            importlib.import_module(name)
            break
        except ImportError:
            continue


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """A forked rank dies with this worker (a death signal is not inherited across fork), so no
    rank outlives a worker killed from outside, even one whose peer hangs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_child(rank: int, request: dict, port: int, ident: str) -> None:
    """In a forked child: output into the cell's log, the cell's environment, then the rank."""
    try:
        _die_with_parent()
        fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(request.get("env", {}))
        os.environ["VLLM_DIST_IDENT"] = ident
        args, server_argv = lw._args(request["argv"])
        os.makedirs(args.loadcheck_out, exist_ok=True)
        lw._rank(rank, args, server_argv, port)  # exits the process itself
    finally:
        os._exit(3)  # only reached when _rank could not even start


def _world_run(request: dict, n: int) -> dict:
    t0 = time.monotonic()
    _, server_argv = lw._args(request["argv"])
    world = lw._world(server_argv)
    port = lw._free_port()
    ident = f"servematrix-sweep-{os.getpid()}-{n}"
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _rank_child(rank, request, port, ident)
        pids.append(pid)
    codes: dict[int, int] = {}
    failed_at = None
    while len(codes) < world:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE:
                for p in pids:
                    if p not in codes:
                        os.kill(p, signal.SIGKILL)
            time.sleep(POLL)
            continue
        if pid in pids:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and failed_at is None:
                failed_at = time.monotonic()
    lw.remove_shm(ident)  # every rank is reaped: a failed or killed one left its segments behind
    return {"codes": [codes[p] for p in pids], "seconds": round(time.monotonic() - t0, 2)}


def serve(directory: str) -> int:
    t0 = time.monotonic()
    _preimport()
    _write(os.path.join(directory, "ready.json"), {"pid": os.getpid(), "seconds": round(time.monotonic() - t0, 2)})
    print(f"{lw.MARK} persistent worker {os.getpid()} ready in {time.monotonic() - t0:.1f} s", flush=True)
    n = 0
    while True:
        path = os.path.join(directory, f"request-{n}.json")
        if not os.path.exists(path):
            time.sleep(POLL)
            continue
        with open(path) as f:
            request = json.load(f)
        if request.get("stop"):
            return 0
        _write(os.path.join(directory, f"response-{n}.json"), _world_run(request, n))
        n += 1


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
