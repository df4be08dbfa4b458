"""Progress: `[k/n] id: phase (elapsed)` lines on stderr as entries move through their phases, and
one line per finished record; on a terminal a ticker redraws the elapsed time.

The id (built from a matrix's and a scenario's names) and a failure's signature (a line of the
server's output) are read from files: both go through redact.terminal, so they can neither redraw
the terminal nor forge a line, a secret in a signature is masked, and a huge one is cut."""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

from servematrix.redact import terminal

if TYPE_CHECKING:
    from servematrix.record import ScenarioRecord


class Progress:
    """`[k/n] id: phase (elapsed)` lines; on a terminal a ticker also redraws the elapsed time."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self._label, self._t0, self._lock = "", time.monotonic(), threading.Lock()
        self._stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def phase(self, k: int, entry_id: str, phase: str) -> None:
        with self._lock:
            self._label, self._t0 = f"[{k}/{self.total}] {terminal(entry_id)}: {terminal(phase)}", time.monotonic()
            self._write(f"{self._label}\n")

    def done(self, rec: "ScenarioRecord", n: int) -> None:
        """The n-th record of the run is in (records arrive in completion order)."""
        with self._lock:
            why = f" — {terminal(rec.failure.signature)}" if rec.failure else ""
            self._label = ""
            self._write(f"[{n}/{self.total} done] {terminal(rec.id)}: {rec.verdict.upper()} in {rec.seconds:.0f} s{why}\n")

    def _write(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._label:
                    self.stream.write(f"\r\x1b[K{self._label} ({time.monotonic() - self._t0:.0f} s)")
                    self.stream.flush()

    def close(self) -> None:
        self._stop.set()
