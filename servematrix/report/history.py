"""History: every run appends to a SQLite file beside the run directories (reports/history.sqlite),
so verdicts and accuracies can be followed per scenario across runs, and two runs compared."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from servematrix.errors import StateError
from servematrix.redact import redact_text
from servematrix.record import RunSummary

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_dir TEXT PRIMARY KEY, matrix TEXT, started_at TEXT, ended_at TEXT, status TEXT,
  exit_code INTEGER, vllm TEXT, torch TEXT, host TEXT
);
CREATE TABLE IF NOT EXISTS results (
  run_dir TEXT, scenario_id TEXT, verdict TEXT, load_ok INTEGER, load_seconds REAL,
  signature TEXT, metrics TEXT, accuracy TEXT, seconds REAL,
  PRIMARY KEY (run_dir, scenario_id)
);
"""
RESULT_COLUMNS = 9


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
    if "seconds" not in _columns(con):
        con.execute("ALTER TABLE results ADD COLUMN seconds REAL")  # databases from before durations


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
                          json.dumps([c.model_dump() for c in r.accuracy]), r.seconds))
               for r in summary.scenarios]

    def attempt() -> None:
        con = sqlite3.connect(path, timeout=BUSY_POLL)
        try:
            _migrate(con)
            with con:  # one transaction: the run and its results, or nothing
                con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?)", run)
                con.execute("DELETE FROM results WHERE run_dir = ?", (run[0],))
                con.executemany(f"INSERT INTO results VALUES ({','.join('?' * RESULT_COLUMNS)})", results)
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
    """Per scenario id, its last `last` results, oldest first."""
    rows = _read(path, lambda con: con.execute(
        "SELECT r.scenario_id, r.verdict, r.metrics, r.signature, u.started_at, u.run_dir, u.vllm "
        "FROM results r JOIN runs u USING (run_dir) ORDER BY u.started_at").fetchall())
    out: dict[str, list[dict]] = {}
    for sid, verdict, metrics, sig, started, run_dir, vllm in rows or []:
        if scenario and scenario not in sid:
            continue
        out.setdefault(sid, []).append({"verdict": verdict, "metrics": _metrics(path, metrics),
                                        "signature": sig, "started_at": started, "run_dir": run_dir,
                                        "vllm": vllm})
    return {k: v[-last:] for k, v in out.items()}


def _metrics(path: Path, text: str | None) -> dict:
    """A row's metrics as append wrote them ({name: {mean, ...}}); anything else is damage."""
    try:
        metrics = json.loads(text or "{}")
    except ValueError:
        metrics = None
    ok = isinstance(metrics, dict) and all(isinstance(v, dict) and isinstance(v.get("mean"), (int, float))
                                           for v in metrics.values())
    if not ok:
        raise StateError(path, f"a results row holds metrics servematrix did not write ({str(text)[:60]!r}); "
                               "move the database aside to start a new one")
    return metrics


def render_trend(t: dict[str, list[dict]]) -> str:
    lines = []
    for sid, items in sorted(t.items()):
        verdicts = " ".join(i["verdict"] for i in items)
        lines.append(f"{sid}: {verdicts}")
        names = sorted({m for i in items for m in i["metrics"]})
        for m in names:
            vals = ["   -  " if m not in i["metrics"] else f"{i['metrics'][m]['mean']:.4f}" for i in items]
            lines.append(f"    {m}: {' '.join(vals)}")
    return "\n".join(lines) or "no history yet"

