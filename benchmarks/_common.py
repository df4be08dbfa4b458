"""What the benchmarks share: the matrix entry an `--matrix/--entry` pair names (with its
scenario and resolved checkpoint), and a by-hand server (plain Popen in its own session, as a
person's script starts it) waited for with servematrix's own health wait and stopped by SIGTERM
to its group. Imported as `_common` (the benchmarks' directory is first on sys.path when one runs);
it puts the repository on sys.path for the benchmark's own servematrix imports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.checkpoint.resolve import resolve  # noqa: E402
from servematrix.config.matrix import Entry, load_matrix  # noqa: E402
from servematrix.config.scenario import Scenario  # noqa: E402
from servematrix.serve.server import wait_healthy  # noqa: E402

HEALTHY_TIMEOUT = 1800.0  # s: a GPU start-up with compilation stays well inside


class Target(NamedTuple):
    entry: Entry
    scenario: Scenario
    model_path: Path


def add_target_args(ap, matrix: str, entry: str) -> None:
    ap.add_argument("--matrix", default=matrix, help="matrix file, relative to the repository")
    ap.add_argument("--entry", default=entry, help="the entry id to benchmark")


def target(matrix_path: str, entry_id: str, forge: bool = True) -> Target:
    """The entry `entry_id` of `matrix_path`, its scenario and checkpoint (forged or converted
    now, when `forge`: caching makes it free the next time, so it stays outside every timing).
    An unknown entry is exit 2 with one line naming --entry and what the matrix holds."""
    matrix = load_matrix(REPO / matrix_path)
    entry = next((e for e in matrix.entries if e.id == entry_id), None)
    if entry is None:
        ids = ", ".join(e.id for e in matrix.entries[:6]) + (", ..." if len(matrix.entries) > 6 else "")
        print(f"--entry: no entry {entry_id!r} in {matrix_path} (it has: {ids})", file=sys.stderr)
        raise SystemExit(2)
    scenario = matrix.scenario(entry.scenario)
    return Target(entry, scenario, resolve(scenario) if forge else Path())


def start(argv: list[str], env: dict, stdout) -> subprocess.Popen:
    """A server as a person's script starts it: its own session, output to `stdout`."""
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=stdout, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_up(base_url: str, server: subprocess.Popen, log: Path, timeout: float = HEALTHY_TIMEOUT) -> None:
    """Until /health answers (servematrix's own wait: a probe every 0.5 s, like a curl loop)."""
    state = wait_healthy(base_url, server.poll, time.monotonic() + timeout)
    if state != "healthy":
        raise SystemExit(f"server {'died' if state == 'exited' else 'not healthy in time'}, see {log}")


def stop(server: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the server's group, then wait for it (what a script's cleanup does)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    server.wait(timeout=timeout)
