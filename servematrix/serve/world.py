"""The runner's side of the persistent load-check worker (zygote.py runs in the release's vLLM):
one per release, started on first use, fed one check at a time; a check that crashes or hangs the
worker kills it (its whole process tree, by serve/process's one stop rule) and is recorded as that
cell's failure alone: the next check starts a fresh worker.

`run_check` gives the same LoadCheckResult / StageFailed as serve.loadcheck.run, so a cell's
record does not depend on whether it ran here or in a process of its own (`--isolated`). `Worlds`
is a run's pool of them (the pipeline's load-check entries), one per vLLM release.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from servematrix.record import Failure, LoadCheckResult, LoadResult, StageFailed
from servematrix.redact import redact_text
from servematrix.serve import loadcheck
from servematrix.serve.process import spawn, stop
from servematrix.serve.server import LaunchSpec

ZYGOTE = Path(__file__).with_name("zygote.py")
POLL = 0.01  # s between looks for the worker's answer
READY_TIMEOUT = 300.0  # s for the worker's imports (about 10 s alone; minutes while others load the host)


class WorkerDied(Exception):
    """The persistent worker itself is gone (or never became ready): the check could not run."""


class ActorLost(Exception):
    """A world held elsewhere (a Ray actor, run/ray_worlds.py) is gone mid-check with its actor or
    its node: the cell reached no verdict, and the sweep's scheduler (sweep/spread.py) retries it on
    another world. Here, beside WorkerDied, so both stages that meet it import it from below them."""


class World:
    """A persistent worker: one process that imported vLLM, forking a world of ranks per check."""

    def __init__(self, python: str, env: dict[str, str], directory: Path, script: Path = ZYGOTE):
        self.python, self.env, self.root, self.script = python, env, Path(directory), script
        self.proc = None
        self.starts = 0  # how many times a worker was started (1 + restarts)
        self.n = 0
        self._log = None

    def _start(self) -> None:
        self.starts += 1
        self.dir = self.root / f"worker-{self.starts}"
        # A run directory reused with --overwrite still holds an earlier run's world here: its
        # ready.json and response-<n>.json would answer this world's checks before it ran them
        # (seen: a second sweep into one directory got the first one's exit codes in 0.0 s), and
        # its request-<n>.json files would be run again. A world starts from an empty directory.
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._log = open(self.dir / "worker.log", "wb", buffering=0)
        self.proc = spawn([self.python, "-P", str(self.script), str(self.dir)], self.env, self._log)
        self.n = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while not (self.dir / "ready.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = (self.dir / "worker.log").read_text(errors="replace")[-2000:]
                raise WorkerDied(f"the persistent worker did not start: {tail}")
            time.sleep(POLL)

    def check(self, argv: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
        """Run one check (the worker's argv, as loadcheck.command gives it, less the interpreter
        and script); its exit status (0 when every rank passed), or None when it hung past
        `timeout` or took the worker down: then the worker is killed, and restarted next time."""
        if self.proc is None:
            self._start()
        n = self.n
        self.n += 1
        request = {"argv": argv, "env": env, "log": str(log)}
        tmp = self.dir / f".request-{n}.json"
        tmp.write_text(json.dumps(request))
        os.replace(tmp, self.dir / f"request-{n}.json")
        answer = self.dir / f"response-{n}.json"
        deadline = time.monotonic() + timeout
        while not answer.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                return None
            time.sleep(POLL)
        codes = json.loads(answer.read_text())["codes"]
        return 0 if all(c == 0 for c in codes) else next(c for c in codes if c != 0)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=0)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def run_check(world: World, spec: LaunchSpec, check: loadcheck.Check) -> LoadCheckResult:
    """loadcheck.run's contract through a persistent worker."""
    loadcheck.prepare(check)
    argv = loadcheck.command(spec, check)[3:]  # less python -P worker.py: the zygote runs the ranks
    spec.log_path.write_text(f"$ {loadcheck.shell(spec, check)}\n")
    t0 = time.monotonic()
    try:
        code = world.check(argv, spec.env, spec.log_path, spec.startup_timeout)
    except WorkerDied as exc:
        fail = Failure.of("exception", f"servematrix: {str(exc).splitlines()[0][:300]}", "load")
        raise StageFailed(fail, load=LoadResult(ok=False, error=fail)) from None
    seconds = round(time.monotonic() - t0, 2)
    # the ranks wrote the log directly: mask secrets as the log pipe of a spawned check does
    spec.log_path.write_text(redact_text(spec.log_path.read_text(errors="replace")))
    if code is None and time.monotonic() - t0 < spec.startup_timeout:
        fail = Failure.of("signal", "the persistent worker died during the check", "load")
        raise StageFailed(fail, load=LoadResult(ok=False, seconds=seconds, error=fail))
    return loadcheck.finish(spec, check, code, seconds)


class Worlds:
    """One run's persistent worlds, one per vLLM release, each started by that release's first load
    check (with its environment: the release's LD_PRELOAD and quirks must be there when vLLM is
    imported) and ended by close(). A world serves one check at a time; checks of different
    releases may run at once. `make(python, env, directory)` builds a world: a World here (the
    default; a Ray actor holds a Worlds of its own, run/ray_worlds.py), or a scripted one in the
    unit tests."""

    def __init__(self, directory: Path, script: Path = ZYGOTE, make=None):
        self.directory, self.script = Path(directory), script
        self.make = make or (lambda python, env, d: World(python, env, d, self.script))
        self._worlds: dict[str, tuple[World, threading.Lock]] = {}
        self._lock = threading.Lock()

    def check(self, release: str, spec: LaunchSpec, check: loadcheck.Check, env: dict[str, str]) -> LoadCheckResult:
        """`check` in `release`'s world, started with `env` (what every check of the release shares;
        a rank adds its own spec.env over it, it cannot take a variable away)."""
        with self._lock:
            if release not in self._worlds:
                world = self.make(spec.argv[0], env, self.directory / release)
                self._worlds[release] = (world, threading.Lock())
            world, busy = self._worlds[release]
        with busy:
            return run_check(world, spec, check)

    def close_others(self, keep: str) -> None:
        """End every world but `keep`'s: a run whose releases come one after another frees a
        finished release's memory (and its Ray slot) before the next one's checks."""
        with self._lock:
            for release in [r for r in self._worlds if r != keep]:
                self._worlds.pop(release)[0].close()

    def close(self) -> None:
        with self._lock:
            for world, _ in self._worlds.values():
                world.close()
            self._worlds.clear()
