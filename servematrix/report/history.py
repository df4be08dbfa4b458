"""History: every run appends to a SQLite file beside the run directories (reports/history.sqlite),
so verdicts and accuracies can be followed per scenario across runs, and two runs compared."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servematrix.errors import StateError
from servematrix.redact import redact_text, terminal
from servematrix.record import RunSummary, Verdict
from servematrix.report import jsonio

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_dir TEXT PRIMARY KEY, matrix TEXT, started_at TEXT, ended_at TEXT, status TEXT,
  exit_code INTEGER, vllm TEXT, torch TEXT, host TEXT
);
CREATE TABLE IF NOT EXISTS results (
  run_dir TEXT, scenario_id TEXT, verdict TEXT, load_ok INTEGER, load_seconds REAL,
  signature TEXT, metrics TEXT, accuracy TEXT, seconds REAL, release TEXT, fixes TEXT,
  PRIMARY KEY (run_dir, scenario_id)
);
"""
# results columns added after the first databases were written: (name, type), added by _migrate;
# a reader selects NULL for those an old database lacks (a read never migrates)
ADDED_COLUMNS = (("seconds", "REAL"), ("release", "TEXT"), ("fixes", "TEXT"))
RESULT_COLUMNS = ("run_dir", "scenario_id", "verdict", "load_ok", "load_seconds", "signature", "metrics",
                  "accuracy", "seconds", "release", "fixes")


READ_WAIT = 2.0  # s a reader (history, diff, the dispatcher's estimates) waits for another's lock
WRITE_WAIT = 15.0  # s the runner's append waits: another run's append takes milliseconds
BUSY_POLL = 0.1  # s of SQLite's own busy wait per attempt: the waiting between is Python's (Ctrl-C works)


def db_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / "history.sqlite"


def _retrying(path: Path, fn, wait: float, what: str):
    """fn() until no other connection holds the lock, for at most `wait` seconds. SQLite's own busy
    wait sleeps in C where Ctrl-C is not seen; these short attempts with time.sleep between are."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _unusable(path, exc) from exc
            if time.monotonic() >= deadline:
                raise StateError(path, f"locked by another process for {wait:g} s (another run, or an open "
                                       f"sqlite3 session?); {what}") from exc
            time.sleep(BUSY_POLL)
        except sqlite3.DatabaseError as exc:
            raise _unusable(path, exc) from exc


def _unusable(path: Path, exc: sqlite3.Error) -> StateError:
    return StateError(path, f"not a usable servematrix history database ({exc}); move it aside to start a new one")


def _existing(path: Path) -> bool:
    """Whether there is history at `path`: a missing or empty file holds none; anything but a
    regular file is not a database of ours."""
    if not path.exists():
        return False
    if not path.is_file():
        raise StateError(path, "is not a file; a history database (history.sqlite) is expected")
    return path.stat().st_size > 0


def _read(path: Path, query) -> object | None:
    """query(con) on a read-only connection, or None when there is no history yet. A read never
    creates, migrates or changes the file."""
    path = Path(path)
    if not _existing(path):
        return None

    def attempt():
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_POLL)
        try:
            return query(con)
        finally:
            con.close()

    return _retrying(path, attempt, READ_WAIT, "not read")


def check(path: Path) -> None:
    """Fail now, before a run starts, if the history it would append to exists but is unusable."""
    _read(path, lambda con: [con.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchall() for t in ("runs", "results")])


def _columns(con: sqlite3.Connection) -> set[str]:
    return {row[1] for row in con.execute("PRAGMA table_info(results)")}


def _migrate(con: sqlite3.Connection) -> None:
    con.executescript(SCHEMA)
    have = _columns(con)
    for name, kind in ADDED_COLUMNS:  # databases from before durations, releases and fix reports
        if name not in have:
            con.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")


def _redacted(row: tuple) -> tuple:
    return tuple(redact_text(v) if isinstance(v, str) else v for v in row)


def append(summary: RunSummary, path: Path | None = None) -> Path:
    path = Path(path or db_path(Path(summary.run_dir)))
    if path.exists() and not path.is_file():
        raise StateError(path, "is not a file; a history database (history.sqlite) is expected")
    run = _redacted((summary.run_dir, summary.matrix, summary.started_at, summary.ended_at, summary.status,
                     summary.exit_code, summary.vllm_version, summary.torch_version, summary.host))
    results = [_redacted((summary.run_dir, r.id, r.verdict, None if r.load is None else int(r.load.ok),
                          None if r.load is None else r.load.seconds, r.failure.signature if r.failure else None,
                          json.dumps({k: v.model_dump() for k, v in r.metrics.items()}),
                          json.dumps([c.model_dump() for c in r.accuracy]), r.seconds, r.vllm,
                          json.dumps([f.model_dump() for f in r.fixes])))
               for r in summary.scenarios]

    def attempt() -> None:
        con = sqlite3.connect(path, timeout=BUSY_POLL)
        try:
            _migrate(con)
            with con:  # one transaction: the run and its results, or nothing
                con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?)", run)
                con.execute("DELETE FROM results WHERE run_dir = ?", (run[0],))
                con.executemany(f"INSERT INTO results ({','.join(RESULT_COLUMNS)}) "
                                f"VALUES ({','.join('?' * len(RESULT_COLUMNS))})", results)
        finally:
            con.close()

    _retrying(path, attempt, WRITE_WAIT, "this run was not appended (its reports are written)")
    return path


def durations(path: Path) -> dict[str, float]:
    """Each scenario's latest wall time that ended in a verdict on vLLM (the dispatcher's estimate)."""
    def query(con):
        columns = _columns(con)
        if not columns:
            raise sqlite3.OperationalError("no such table: results")
        if "seconds" not in columns:
            return []  # a database from before durations: no estimates (a read does not migrate)
        return con.execute("SELECT r.scenario_id, r.seconds FROM results r JOIN runs USING (run_dir) "
                           "WHERE r.seconds IS NOT NULL AND r.verdict != 'error' ORDER BY runs.started_at").fetchall()

    return {sid: secs for sid, secs in _read(path, query) or []}


def trend(path: Path, last: int = 10, scenario: str | None = None) -> dict[str, list[dict]]:
    """Per scenario id, its last `last` results, oldest first: verdict, metrics, accuracy checks
    (as CheckResult dicts), signature, run (started_at, run_dir, vllm version), the entry's release
    and its fix reports ([] and None where the database is from before they were kept)."""
    def query(con):
        have = _columns(con)
        extra = ", ".join(f"r.{c}" if c in have else "NULL" for c in ("release", "fixes"))
        return con.execute("SELECT r.scenario_id, r.verdict, r.metrics, r.accuracy, r.signature, u.started_at, "
                           f"u.run_dir, u.vllm, {extra} FROM results r JOIN runs u USING (run_dir) "
                           "ORDER BY u.started_at, u.run_dir").fetchall()

    out: dict[str, list[dict]] = {}
    for sid, verdict, metrics, accuracy, sig, started, run_dir, vllm, release, fixes in _read(path, query) or []:
        row = _row(path, sid, verdict, sig, started, run_dir, vllm, release)
        if scenario and scenario not in row.scenario_id:
            continue
        out.setdefault(row.scenario_id, []).append(
            {**row.model_dump(exclude={"scenario_id"}), "metrics": _metrics(path, metrics),
             "accuracy": _list(path, accuracy, ("metric", "status")), "fixes": _list(path, fixes, ("name", "status"))})
    return {k: v[-last:] for k, v in out.items()}


class _Row(BaseModel):
    """The text columns of one results row joined with its run, as append wrote them. SQLite keeps
    whatever type a writer gave a column: a row another tool wrote (an integer verdict, a NULL
    id) is refused here, by its column, instead of breaking the gate or waivers downstream."""

    model_config = ConfigDict(strict=True)
    scenario_id: str
    verdict: Verdict  # one servematrix writes: the gate's hysteresis and waivers read it
    signature: str | None
    started_at: str
    run_dir: str
    vllm: str | None
    release: str | None


def _row(path: Path, sid, verdict, sig, started, run_dir, vllm, release) -> _Row:
    try:
        return _Row(scenario_id=sid, verdict=verdict, signature=sig, started_at=started, run_dir=run_dir,
                    vllm=vllm, release=release)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StateError(path, f"a results row holds a {err['loc'][0]} servematrix did not write "
                               f"({terminal(repr(err.get('input')), 60)}: {err['msg']}); "
                               "move the database aside to start a new one") from None


def _list(path: Path, text: str | None, keys: tuple[str, ...]) -> list[dict]:
    """A row's JSON list of objects (accuracy checks, fix reports) as append wrote it: each with the
    text `keys` its readers (waivers, trends) take for granted."""
    try:
        items = jsonio.loads(text or "[]")
    except ValueError:
        items = None
    if not (isinstance(items, list) and all(isinstance(i, dict) and all(type(i.get(k)) is str for k in keys)
                                            for i in items)):
        raise StateError(path, f"a results row holds a list servematrix did not write ({str(text)[:60]!r}); "
                               "move the database aside to start a new one")
    return items


def _metrics(path: Path, text: str | None) -> dict:
    """A row's metrics as append wrote them ({name: {mean, ...}}); anything else is damage."""
    try:
        metrics = jsonio.loads(text or "{}")
    except ValueError:
        metrics = None
    ok = isinstance(metrics, dict) and all(isinstance(v, dict) and _number(v.get("mean")) for v in metrics.values())
    if not ok:
        raise StateError(path, f"a results row holds metrics servematrix did not write ({str(text)[:60]!r}); "
                               "move the database aside to start a new one")
    return metrics


def _number(x) -> bool:
    """A metric's mean as append wrote it: a float (NaN included: "not measured"), or an int a float
    can hold (a 400-digit integer cannot be printed as one)."""
    return type(x) is float or (type(x) is int and abs(x) < 1 << 1000)


def render_trend(t: dict[str, list[dict]]) -> str:
    """`servematrix history`'s lines. Ids, verdicts and metric names are the database's text (any
    process may have written it): shown through redact.terminal, never obeyed."""
    lines = []
    for sid, items in sorted(t.items()):
        verdicts = " ".join(terminal(i["verdict"], 16) for i in items)
        lines.append(f"{terminal(sid)}: {verdicts}")
        names = sorted({m for i in items for m in i["metrics"]})
        for m in names:
            vals = ["   -  " if m not in i["metrics"] else f"{i['metrics'][m]['mean']:.4f}" for i in items]
            lines.append(f"    {terminal(m)}: {' '.join(vals)}")
    return "\n".join(lines) or "no history yet"



# --- hysteresis: a scenario's standing over its recent runs (vLLM CI's rule) -------------------------
BROKEN_AFTER = 2  # distinct runs in a row that missed their expectation
FIXED_AFTER = 3  # clean runs in a row
MET, MISSED = {"pass", "xfail"}, {"fail", "xpass"}  # as report.comparison; error/skipped: no verdict on vLLM


class Standing(BaseModel):
    """Where a scenario stands after a window of runs: `broken` flips only after BROKEN_AFTER
    missed runs in a row and back only after FIXED_AFTER clean ones; an error or a skip (no
    verdict on vLLM) neither counts nor breaks a streak. `flips`/`runs`: how often consecutive
    judged runs disagreed, the flake rate, with its Wilson interval."""

    state: Literal["ok", "broken"]
    runs: int  # judged runs in the window
    flips: int
    streak: int  # judged runs in a row ending the window that agree with the last one
    flake: float | None = None
    flake_low: float | None = None
    flake_high: float | None = None
    verdicts: list[str] = Field(default_factory=list)

    def describe(self) -> str:
        rate = "n/a" if self.flake is None else \
            f"{self.flips}/{self.runs} = {self.flake:.2f} [{self.flake_low:.2f}, {self.flake_high:.2f}]"
        return f"{self.state} after {self.runs} judged runs ({' '.join(self.verdicts)}); flake rate {rate}"


def standing(verdicts: list[str], start: Literal["ok", "broken"] = "ok") -> Standing:
    """The standing after `verdicts` (oldest first), from `start` (the state assumed at the window's
    beginning: vLLM's rule assumes a test healthy until it fails twice)."""
    from servematrix.stats import wilson

    judged = [v for v in verdicts if v in MET or v in MISSED]
    state, streak, flips, prev = start, 0, 0, None
    for v in judged:
        miss = v in MISSED
        streak = streak + 1 if prev is not None and miss == prev else 1
        flips += prev is not None and miss != prev
        prev = miss
        if state == "ok" and miss and streak >= BROKEN_AFTER:
            state = "broken"
        elif state == "broken" and not miss and streak >= FIXED_AFTER:
            state = "ok"
    low, high = wilson(flips, len(judged)) if judged else (None, None)
    return Standing(state=state, runs=len(judged), flips=flips, streak=streak, verdicts=verdicts,
                    flake=flips / len(judged) if judged else None, flake_low=low, flake_high=high)
