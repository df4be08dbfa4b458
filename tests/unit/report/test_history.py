"""History store (SQLite): runs append, trends read back per scenario, diffs between runs."""

import os
import sqlite3
import time

import pytest

from servematrix.report import history
from servematrix.report.comparison import compare_runs
from servematrix.errors import StateError
from servematrix.record import Failure
from servematrix.check.accuracy import judge
from servematrix.config.references import Check
from servematrix.record import MetricValue
from servematrix.config.matrix import Expectation
from servematrix.record import LoadResult, RunSummary, ScenarioRecord


def rec(id_, verdict, agreement):
    m = MetricValue(mean=agreement, sigma=0.3, stderr=0.03, n=100)
    c = judge(Check(metric="gsm8k.agreement", effect=0.1), m, None)
    c.mde = 0.1
    return ScenarioRecord(id=id_, scenario="a", model="a", tp=1, pp=1, quant="fp32", vllm="current", device="cpu",
                          expect=Expectation(), verdict=verdict, load=LoadResult(ok=verdict == "pass"),
                          metrics={"gsm8k.agreement": m}, accuracy=[c], started_at="t", seconds=1)


def run(tmp_path, name, started, *records):
    return RunSummary(matrix="m", run_dir=str(tmp_path / name), host="h", vllm_version="0.32.0",
                      torch_version="t", servematrix_version="0", started_at=started, status="complete",
                      scenarios=list(records))


def test_runs_append_and_trend_reads_them_back_oldest_first(tmp_path):
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", "pass", 0.9)), db)
    history.append(run(tmp_path, "r2", "2026-01-02", rec("a/x", "fail", 0.5)), db)
    t = history.trend(db)
    assert [i["verdict"] for i in t["a/x"]] == ["pass", "fail"]
    assert [i["metrics"]["gsm8k.agreement"]["mean"] for i in t["a/x"]] == [0.9, 0.5]
    assert "a/x: pass fail" in history.render_trend(t)


def test_appending_the_same_run_twice_replaces_it(tmp_path):
    db = tmp_path / "history.sqlite"
    for verdict in ("pass", "fail"):
        history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", verdict, 0.9)), db)
    assert [i["verdict"] for i in history.trend(db)["a/x"]] == ["fail"]


def test_diff_lists_newly_failing_passing_and_moves_beyond_the_mde(tmp_path):
    a = run(tmp_path, "a", "1", rec("a/x", "pass", 0.9), rec("a/y", "fail", 0.9), rec("a/z", "pass", 0.9))
    b = run(tmp_path, "b", "2", rec("a/x", "fail", 0.5), rec("a/y", "pass", 0.88), rec("a/w", "pass", 0.9))
    d = compare_runs(a, b).sections()
    assert [x.split(":")[0] for x in d["newly failing"]] == ["a/x"]
    assert [x.split(":")[0] for x in d["newly passing"]] == ["a/y"]
    assert [x.split(":")[0] for x in d["accuracy moves"]] == ["a/x"]
    assert d["only in A"] == ["a/z"] and d["only in B"] == ["a/w"]


def test_reading_never_creates_or_changes_the_database(tmp_path):
    missing = tmp_path / "none.sqlite"
    assert history.trend(missing) == {} and history.durations(missing) == {} and not missing.exists()
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", "pass", 0.9)), db)
    before = db.read_bytes()
    history.trend(db), history.durations(db), history.check(db)
    assert db.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["history.sqlite"]


def test_a_database_from_before_durations_is_read_without_being_migrated(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(history.SCHEMA.replace(", seconds REAL", ""))
    con.close()
    before = db.read_bytes()
    assert history.durations(db) == {} and history.trend(db) == {} and db.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b"definitely not sqlite" * 50, "file is not a database"),
    (None, "no such table"),  # a real SQLite file, not ours
])
def test_a_corrupt_or_foreign_database_is_a_state_error_naming_it(tmp_path, content, message):
    db = tmp_path / "h.sqlite"
    if content is None:
        sqlite3.connect(db).execute("CREATE TABLE other (x)").connection.commit()
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    for read in (history.trend, history.durations, history.check):
        with pytest.raises(StateError, match=message) as exc:
            read(db)
        assert str(exc.value).startswith(f"{db}: ")
    if content is not None:  # the writer refuses it too, and leaves it as it was
        with pytest.raises(StateError, match=message):
            history.append(run(tmp_path, "r1", "1", rec("a/x", "pass", 0.9)), db)
    assert db.read_bytes() == before


def _locked(db):
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_the_writer_waits_a_bounded_time_for_a_lock_then_names_the_file(tmp_path, monkeypatch):
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "1", rec("a/x", "pass", 0.9)), db)
    monkeypatch.setattr(history, "WRITE_WAIT", 0.5)
    holder = _locked(db)
    try:
        t0 = time.monotonic()
        with pytest.raises(StateError, match="locked by another process for 0.5 s"):
            history.append(run(tmp_path, "r2", "2", rec("a/x", "fail", 0.9)), db)
        assert time.monotonic() - t0 < 3
    finally:
        holder.rollback()
        holder.close()
    assert [i["verdict"] for i in history.trend(db)["a/x"]] == ["pass"]


def test_waiting_for_a_lock_is_interruptible(tmp_path, monkeypatch):
    # the wait between attempts is Python's time.sleep, where Ctrl-C lands (SQLite's own busy
    # wait would swallow it for its whole timeout)
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "1", rec("a/x", "pass", 0.9)), db)

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(history.time, "sleep", ctrl_c)
    holder = _locked(db)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            history.append(run(tmp_path, "r2", "2", rec("a/x", "fail", 0.9)), db)
        assert time.monotonic() - t0 < 1
    finally:
        holder.rollback()
        holder.close()


def test_every_text_written_to_the_history_is_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    r = rec("a/x", "fail", 0.9)
    r.failure = Failure.of("exception", "OSError: bad token hf_supersecretvalue")
    summary = run(tmp_path, "r1", "1", r)
    summary.host = "host-hf_supersecretvalue"
    db = history.append(summary, tmp_path / "history.sqlite")
    con = sqlite3.connect(db)
    dump = "\n".join(con.iterdump())
    con.close()
    assert "hf_supersecretvalue" not in dump and "OSError: bad token ***" in dump


FIRST_SCHEMA = """
CREATE TABLE runs (run_dir TEXT PRIMARY KEY, matrix TEXT, started_at TEXT, ended_at TEXT, status TEXT,
  exit_code INTEGER, vllm TEXT, torch TEXT, host TEXT);
CREATE TABLE results (run_dir TEXT, scenario_id TEXT, verdict TEXT, load_ok INTEGER, load_seconds REAL,
  signature TEXT, metrics TEXT, accuracy TEXT, PRIMARY KEY (run_dir, scenario_id));
INSERT INTO runs VALUES ('/r0', 'm', '2025-12-31', NULL, 'complete', 0, '0.31.0', 't', 'h');
INSERT INTO results VALUES ('/r0', 'a/x', 'pass', 1, 3.0, NULL, '{}', '[]');
"""


def test_release_fix_reports_and_checks_are_kept_per_result(tmp_path):
    from servematrix.record import FixRecord

    db = tmp_path / "history.sqlite"
    r = rec("a/x", "pass", 0.9).model_copy(update={
        "vllm": "cpu-0.20.2", "fixes": [FixRecord(name="minimax-k-norm-38191", status="already-fixed", pid=7)]})
    history.append(run(tmp_path, "r1", "2026-01-01", r), db)
    (row,) = history.trend(db)["a/x"]
    assert row["release"] == "cpu-0.20.2" and row["fixes"] == [{"name": "minimax-k-norm-38191",
                                                                 "status": "already-fixed", "pid": 7, "detail": None}]
    assert row["accuracy"][0]["metric"] == "gsm8k.agreement" and row["accuracy"][0]["mde"] == 0.1


def test_a_first_schema_database_is_read_as_it_is_and_migrated_by_the_next_append(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(FIRST_SCHEMA)
    con.close()
    before = db.read_bytes()
    (row,) = history.trend(db)["a/x"]
    assert (row["release"], row["fixes"], db.read_bytes() == before) == (None, [], True)
    history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", "fail", 0.5)), db)
    rows = history.trend(db)["a/x"]
    assert [(x["verdict"], x["release"]) for x in rows] == [("pass", None), ("fail", "current")]


def test_a_damaged_fix_report_column_is_named_not_misread(tmp_path):
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", "pass", 0.9)), db)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE results SET fixes = '{\"not\": \"a list\"}'")
    con.close()
    with pytest.raises(StateError, match="holds a list servematrix did not write"):
        history.trend(db)
