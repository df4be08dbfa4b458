"""Crash verdict latency: time from the vLLM server process's exit to the load failure being
recorded in summary.json, on a real vLLM whose checkpoint is broken (matrix/broken.yaml).

The exit moment is taken by the kernel: a thread blocks in waitid(WNOWAIT) on the server's pid,
which returns the instant the process exits without reaping it (the launcher still reaps it).
The verdict moment is when the runner has rewritten summary.json with the failed record.

    python benchmarks/crash_latency.py [--repeat N]       (goal: <= 1 s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.serve.server import LocalServer  # noqa: E402

from servematrix.run.options import RunOptions  # noqa: E402
from servematrix.run.session import Session  # noqa: E402
from servematrix.config.matrix import load_matrix  # noqa: E402


class TimedServer(LocalServer):
    """The real local backend, plus a kernel timestamp of the child's exit."""

    exit_at: float | None = None

    def _spawn(self) -> None:
        super()._spawn()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        try:
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            TimedServer.exit_at = time.monotonic()
        except ChildProcessError:
            pass


class TimedSession(Session):
    recorded_at: float | None = None

    def _publish(self, rec, final: bool = True) -> None:
        super()._publish(rec, final)  # writes summary.json
        TimedSession.recorded_at = time.monotonic()


def once(out: Path) -> float:
    matrix = load_matrix(REPO / "matrix" / "broken.yaml")
    r = TimedSession.of(matrix, matrix.entries, RunOptions.of(out, retries=0))
    r.work.pipeline.make_server = TimedServer
    TimedServer.exit_at = TimedSession.recorded_at = None
    summary = r.run()
    rec = json.loads((out / "summary.json").read_text())["scenarios"][0]
    assert rec["load"]["ok"] is False and summary.scenarios[0].verdict == "xfail", rec
    return TimedSession.recorded_at - TimedServer.exit_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    lat = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            lat.append(once(Path(tmp) / "run"))
        print(f"run {i + 1}: exit -> recorded load failure: {lat[-1] * 1000:.0f} ms", flush=True)
    print(json.dumps({"crash_verdict_latency_s": {"median": statistics.median(lat), "max": max(lat),
                                                  "runs": len(lat)}, "goal_s": 1.0}))


if __name__ == "__main__":
    main()
