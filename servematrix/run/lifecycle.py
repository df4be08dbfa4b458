"""A run's lifecycle, the one both `run` (Session) and `sweep` go through: the run directory claimed
before anything is written, the RunSummary, `latest` pointed at the run, Ctrl-C / SIGTERM ending
it as "interrupted", each record published the moment it exists (record.json in its entry's
directory, summary.json, the reports), and at the end the status, the verdict counts, the exit
code, the history row and the reports with their trend.

What differs between the two commands is only what produces the records (Session's pool of
pipelines, the sweep's cells) and which reports are written (`write`: report.write_all, or the
sweep's with its coverage); the run around them is this class."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from servematrix import __version__
from servematrix.check.verdict import exit_code
from servematrix.record import RunSummary, ScenarioRecord
from servematrix.report import history, write_all
from servematrix.files import point_latest
from servematrix.run import records, rundir
from servematrix.run.signals import interrupts

# write(summary, trend, pages_of): every report of the run (pages_of: the ids whose page changed)
Write = Callable[[RunSummary, "dict | None", "Iterable[str] | None"], None]


def default_write(summary: RunSummary, trend: dict | None = None, pages_of: Iterable[str] | None = None) -> None:
    write_all(summary, trend, pages_of)


def counts(scenarios: Iterable[ScenarioRecord]) -> dict[str, int]:
    """The run's verdict count (summary.counts): records per verdict, in order of first appearance."""
    out: dict[str, int] = {}
    for r in scenarios:
        out[r.verdict] = out.get(r.verdict, 0) + 1
    return out


def run_exit_code(summary: RunSummary) -> int:
    """The verdicts' exit code; 2 for a run that did not complete and found nothing to report."""
    code = exit_code([r.verdict for r in summary.scenarios])
    return 2 if summary.status != "complete" and code == 0 else code


class _Throttle:
    """Full rewrites spaced so that they take at most `share` of the run's time: a rewrite costs
    more the more records there are (2.3 s at 2 000 records, measured on the 0.20.2 zoo), so late in
    a big run the reports lag by a few records (each record.json is on disk the moment it exists)."""

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.clock = share, clock
        self.cost, self.at = 0.0, 0.0

    def maybe(self, write: Callable[[], None]) -> None:
        now = self.clock()
        if now - self.at < self.cost / self.share:
            return
        write()
        self.at = self.clock()
        self.cost = self.at - now


class RunLifecycle:
    """One run into `out`. `claim()` first (refused before anything is written), then `start(...)`
    for the summary, then the body inside `running()`, publishing each record with `publish`.
    `throttle`: the largest share of the run's time full report rewrites may take (None: the
    pages of each published record are rewritten at once)."""

    def __init__(self, out: Path, overwrite: bool = False, write: Write | None = None,
                 throttle: float | None = None) -> None:
        self.out, self.overwrite = Path(out), overwrite
        self.write = write or default_write
        self._throttle = _Throttle(throttle) if throttle else None
        self._deferred: list[str] | None = None  # ids published inside batch()
        self.summary: RunSummary | None = None

    def claim(self) -> None:
        rundir.claim(self.out, self.overwrite)

    def start(self, name: str, versions: dict, selected: list[str], started_at: str | None = None) -> RunSummary:
        from servematrix.run.pipeline import now_iso

        self.summary = RunSummary(matrix=name, run_dir=str(self.out), host=platform.node(),
                                  vllm_version=versions.get("vllm"), torch_version=versions.get("torch"),
                                  servematrix_version=__version__, started_at=started_at or now_iso(),
                                  selected=selected)
        return self.summary

    @contextlib.contextmanager
    def running(self, cleanup: Callable[[], None] = lambda: None) -> Iterator[RunSummary]:
        """The body of the run: Ctrl-C and SIGTERM end it "interrupted" (the body may also set that
        status itself), any other exception "error"; on every path `cleanup` runs (servers and
        workers stopped), then the run is closed."""
        summary = self.summary
        self.write(summary, None, None)
        point_latest(self.out)
        with interrupts():
            try:
                yield summary
                if summary.status == "running":
                    summary.status = "complete"
            except KeyboardInterrupt:
                summary.status = "interrupted"
            finally:
                try:
                    cleanup()
                finally:
                    self._close()

    def _close(self) -> None:
        summary = self.summary
        from servematrix.run.pipeline import now_iso

        summary.ended_at = now_iso()
        if summary.status == "running":
            summary.status = "error"
        summary.counts = counts(summary.scenarios)
        summary.exit_code = run_exit_code(summary)
        self.write(summary, None, None)
        db = history.append(summary)
        self.write(summary, history.trend(db), None)

    def publish(self, rec: ScenarioRecord, rewrite: bool = True) -> None:
        """Into summary.json (a pending record of the same id is replaced; the new one goes last)
        and the entry's record.json, both before anything else runs; then the reports, unless
        `rewrite` is off (the sweep's not-checkable cells: a run of them costs no rewrite)."""
        summary = self.summary
        summary.scenarios = [r for r in summary.scenarios if r.id != rec.id] + [rec]
        summary.counts = counts(summary.scenarios)
        records.save_record(self.out, rec)
        if self._deferred is not None:
            self._deferred.append(rec.id)
        elif not rewrite:
            return
        elif self._throttle is not None:
            self._throttle.maybe(lambda: self.write(summary, None, [rec.id]))
        else:
            self.write(summary, None, [rec.id])  # the other pages did not change (and the close writes all)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Records published inside are each on disk at once (record.json), and the run's reports
        are rewritten once at the end instead of per record: rewriting them (O(records)) per record
        made a run of 1,000 skipped entries quadratic (691 records after 300 s)."""
        self._deferred = []
        try:
            yield
        finally:
            ids, self._deferred = self._deferred, None
            if ids:
                self.write(self.summary, None, ids)
