"""History: every run appends to a SQLite file beside the run directories (reports/history.sqlite),
so verdicts and accuracies can be followed per scenario across runs, and two runs compared."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from servematrix.results import RunSummary

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


def db_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / "history.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30)
    con.executescript(SCHEMA)
    if "seconds" not in {row[1] for row in con.execute("PRAGMA table_info(results)")}:
        con.execute("ALTER TABLE results ADD COLUMN seconds REAL")  # databases from before durations
    return con


def append(summary: RunSummary, path: Path | None = None) -> Path:
    path = path or db_path(Path(summary.run_dir))
    with connect(path) as con:
        con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?)",
                    (summary.run_dir, summary.matrix, summary.started_at, summary.ended_at, summary.status,
                     summary.exit_code, summary.vllm_version, summary.torch_version, summary.host))
        con.execute("DELETE FROM results WHERE run_dir = ?", (summary.run_dir,))
        con.executemany(f"INSERT INTO results VALUES ({','.join('?' * RESULT_COLUMNS)})", [
            (summary.run_dir, r.id, r.verdict, None if r.load is None else int(r.load.ok),
             None if r.load is None else r.load.seconds, r.failure.signature if r.failure else None,
             json.dumps({k: v.model_dump() for k, v in r.metrics.items()}),
             json.dumps([c.model_dump() for c in r.accuracy]), r.seconds)
            for r in summary.scenarios])
    return path


def durations(path: Path) -> dict[str, float]:
    """Each scenario's latest wall time that ended in a verdict on vLLM (the dispatcher's estimate)."""
    if not Path(path).is_file():
        return {}
    with connect(path) as con:
        rows = con.execute("SELECT r.scenario_id, r.seconds FROM results r JOIN runs USING (run_dir) "
                           "WHERE r.seconds IS NOT NULL AND r.verdict != 'error' ORDER BY runs.started_at")
        return {sid: secs for sid, secs in rows}


def trend(path: Path, last: int = 10, scenario: str | None = None) -> dict[str, list[dict]]:
    """Per scenario id, its last `last` results, oldest first."""
    if not Path(path).is_file():
        return {}
    with connect(path) as con:
        rows = con.execute(
            "SELECT r.scenario_id, r.verdict, r.metrics, r.signature, u.started_at, u.run_dir, u.vllm "
            "FROM results r JOIN runs u USING (run_dir) ORDER BY u.started_at", ()).fetchall()
    out: dict[str, list[dict]] = {}
    for sid, verdict, metrics, sig, started, run_dir, vllm in rows:
        if scenario and scenario not in sid:
            continue
        out.setdefault(sid, []).append({"verdict": verdict, "metrics": json.loads(metrics or "{}"),
                                        "signature": sig, "started_at": started, "run_dir": run_dir,
                                        "vllm": vllm})
    return {k: v[-last:] for k, v in out.items()}


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


def diff(a: RunSummary, b: RunSummary) -> dict[str, list[str]]:
    """What changed from run A to run B: verdicts, and metric moves larger than B's check MDE."""
    a_by = {r.id: r for r in a.scenarios}
    out: dict[str, list[str]] = {"newly failing": [], "newly passing": [], "accuracy moves": [],
                                 "only in A": [], "only in B": []}
    good = {"pass", "xfail"}
    for r in b.scenarios:
        old = a_by.get(r.id)
        if old is None:
            out["only in B"].append(r.id)
            continue
        if old.verdict in good and r.verdict not in good:
            out["newly failing"].append(f"{r.id}: {old.verdict} → {r.verdict}"
                                        + (f" ({r.failure.signature})" if r.failure else ""))
        elif old.verdict not in good and r.verdict in good:
            out["newly passing"].append(f"{r.id}: {old.verdict} → {r.verdict}")
        for c in r.accuracy:
            before, after = old.metrics.get(c.metric), r.metrics.get(c.metric)
            if before is None or after is None or c.mde is None:
                continue
            if abs(after.mean - before.mean) > c.mde:
                out["accuracy moves"].append(f"{r.id}: {c.metric} {before.mean:.4f} → {after.mean:.4f} "
                                             f"(beyond MDE {c.mde:.4f})")
    out["only in A"] = [i for i in a_by if i not in {r.id for r in b.scenarios}]
    return out
