"""Session: the one run engine. Whatever a run runs — a matrix's entries (run/matrix_work.py) or a
sweep's cells (sweep/runner.py) — it is a `Work` this class drives the same way: the run directory
claimed (run/lifecycle.py), the work's jobs planned, those no pool could ever run recorded at once,
the rest handed to the work's pool (this host's, or a Ray cluster's), each outcome turned into its
records by the work and published the moment it exists (record.json, summary.json, the reports),
Ctrl-C / SIGTERM ending the run "interrupted" with everything the work started stopped, and the
history row and reports at the end.

What a kind of work decides is only what differs: which jobs there are, how one runs (Pipeline's
phases for an entry; a cell's twin and load check through the same phases), which pool runs them,
what an outcome means (an entry's layout is compared with its baseline's record first; a cell is
counted in the sweep's coverage) and how its progress reads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from servematrix.record import EntryOutcome, RunSummary, ScenarioRecord
from servematrix.run import dispatch
from servematrix.run.lifecycle import RunLifecycle, Write

Done = Callable[[dispatch.Job, EntryOutcome], bool]  # -> False to start nothing more (interrupted)


class Pool(Protocol):
    """Where a work's jobs run, with what runs each one bound (dispatch.Bound)."""

    capacity: dispatch.Capacity

    def run(self, jobs: list[dispatch.Job], done: Done) -> None: ...


class Work(Protocol):
    """What a run runs. `cancelled` is set when the run is interrupted (a phase in flight then ends
    as interrupted; nothing more starts); `quiet_skips`: a skipped record costs no report rewrite
    (a sweep records thousands of not-checkable cells)."""

    name: str
    ids: list[str]
    started_at: str | None
    cancelled: threading.Event
    quiet_skips: bool

    def versions(self) -> dict: ...

    def jobs(self) -> list[dispatch.Job]: ...

    def pool(self) -> Pool: ...

    def unrunnable(self, job: dispatch.Job, capacity: dispatch.Capacity) -> EntryOutcome | None:
        """The outcome of a job no slot of the pool could ever run, decided now (None: runnable)."""

    def records(self, outcome: EntryOutcome) -> list[tuple[ScenarioRecord, bool]]:
        """The records a finished outcome publishes, each with whether it is final (a layout held
        for its baseline publishes a pending record first)."""

    def published(self, rec: ScenarioRecord, n: int) -> None:
        """The run's n-th final record is in (its progress line)."""

    def cancel(self) -> None:
        """Ctrl-C in a threaded pool: stop what runs now (servers), so each job ends interrupted."""

    def close(self) -> list[ScenarioRecord]:
        """End what the work left running (load-check worlds); the final records still owed."""


class Session:
    def __init__(self, work: Work, out: Path, overwrite: bool = False, write: Write | None = None,
                 throttle: float | None = None):
        self.work = work
        self._lock = threading.Lock()
        self._done = 0  # final records published (pending ones are not done)
        self.lifecycle = RunLifecycle(out, overwrite, write=write, throttle=throttle)

    @classmethod
    def of(cls, matrix, entries, options, pipeline=None) -> "Session":
        """A run of a matrix's `entries` (run/matrix_work.py) with `options` (RunOptions)."""
        from servematrix.run.matrix_work import MatrixWork

        return cls(MatrixWork(matrix, entries, options, pipeline), options.out_dir, options.overwrite)

    def run(self) -> RunSummary:
        run, work = self.lifecycle, self.work
        run.claim()  # refused before anything is written
        summary = run.start(work.name, work.versions(), list(work.ids), started_at=work.started_at)
        with run.running(cleanup=self._close):
            self._dispatch()
            if work.cancelled.is_set():
                summary.status = "interrupted"
        return summary

    def _close(self) -> None:
        for rec in self.work.close():  # e.g. layouts whose baseline never finished (interrupted)
            self._publish(rec)

    def _dispatch(self) -> None:
        """Plan the jobs, record those no pool could ever run, hand the rest to the pool."""
        pool = self.work.pool()
        runnable = []
        with self.lifecycle.batch():  # every such record is decided now, at once: the reports are written once
            for job in self.work.jobs():
                outcome = self.work.unrunnable(job, pool.capacity)
                if outcome is None:
                    runnable.append(job)
                else:
                    self.done(job, outcome)
        pool.run(runnable, self.done)

    def done(self, job: dispatch.Job, outcome: EntryOutcome) -> bool:
        """A job's outcome is in: its records published; False where it was interrupted (the run
        ends "interrupted": nothing more starts)."""
        with self._lock:
            self.finish(outcome)
        if outcome.failure is not None and outcome.failure.kind == "interrupted":
            self.work.cancelled.set()
            return False
        return True

    def finish(self, outcome: EntryOutcome) -> None:
        for rec, final in self.work.records(outcome):
            self._publish(rec, final)

    def _publish(self, rec: ScenarioRecord, final: bool = True) -> None:
        """Into summary.json (a pending record is replaced by the final one, which goes last) and
        the entry's record.json, both written before anything else runs."""
        self.lifecycle.publish(rec, rewrite=not (self.work.quiet_skips and rec.verdict == "skipped"))
        if final:
            self._done += 1
            self.work.published(rec, self._done)
