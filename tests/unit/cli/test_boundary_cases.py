"""Trust at the boundary: every bad input — an argument, a damaged report or database, a target
that is not ours — is exit 2 and ONE line naming the file, field or argument and what would be
accepted; never a traceback; and nothing already on disk changes (a snapshot of the working
directory, the servematrix cache, HOME and XDG_CACHE_HOME before and after must be equal).

Every case runs `servematrix.cli.main` in-process."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from servematrix.report import history
from servematrix.record import MetricValue
from servematrix.cli import main
from servematrix.record import Failure
from servematrix.config.matrix import Expectation
from servematrix.record import LoadResult, RunSummary, ScenarioRecord

REPO = Path(__file__).resolve().parents[3]
MATRIX = str(REPO / "matrix" / "cpu-smoke.yaml")
ENTRY = "tiny-llama/tp1-pp1-fp32"
MARKER = "servematrix-env.json"


# --- fixtures built in tmp_path -----------------------------------------------------------------

def record(id_="a/tp1-pp1-fp32", verdict="pass", metrics=True, expect=Expectation()):
    failure = Failure.of("exception", "KeyError: 'k_scale'") if verdict == "fail" else None
    return ScenarioRecord(
        id=id_, scenario=id_.split("/")[0], model="m", tp=1, pp=1, quant="fp32", vllm="current", device="cpu",
        expect=expect, verdict=verdict, failure=failure, load=None if verdict == "skipped" else LoadResult(ok=True),
        metrics={"gsm8k.nll": MetricValue(mean=1.5, sigma=0.5, stderr=0.05, n=100)} if metrics else {},
        started_at="t", seconds=1, note="needs 8 GPUs" if verdict == "skipped" else None)


def summary_json(run_dir: Path, *records: ScenarioRecord) -> str:
    return RunSummary(matrix="m", run_dir=str(run_dir), host="h", vllm_version="0.32.0", torch_version="t",
                      servematrix_version="0", started_at="t", ended_at="t", status="complete",
                      selected=[r.id for r in records], scenarios=list(records), exit_code=0).model_dump_json(indent=2)


def make_run(root: Path, name: str, text: str | bytes | None = None, *records) -> str:
    """A run directory `name` under root holding summary.json (`text`, or a valid summary)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    text = summary_json(d, *(records or (record(),))) if text is None else text
    (d / "summary.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return name


def make_history(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = RunSummary.model_validate_json(summary_json(path.parent / "r1", record()))
    history.append(s, path)
    return path


class Work:
    """The tmp working directory of one case (cwd), beside the cache, HOME and XDG cache."""

    def __init__(self, tmp: Path):
        self.tmp, self.root = tmp, tmp / "work"
        self.cache, self.envs = tmp / "cache", tmp / "cache" / "envs"

    def file(self, rel: str, text: str = "data\n") -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return rel

    def dir(self, rel: str) -> str:
        (self.root / rel).mkdir(parents=True, exist_ok=True)
        return rel

    def link(self, rel: str, target: str | Path) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
        return rel

    def env_dir(self, name: str, marker: bool) -> Path:
        d = self.envs / name
        (d / "bin").mkdir(parents=True)
        (d / "bin" / "python").write_text("#!/bin/sh\n")
        if marker:
            (d / MARKER).write_text('{"name": "%s"}' % name)
        return d


@pytest.fixture(autouse=True)
def _never_serve(monkeypatch):
    """Every case must be refused before the runner dispatches anything; one that got that far
    fails here instead of starting real vLLM servers (and never probes an interpreter)."""
    from servematrix.run import session
    from servematrix.serve import envs

    def dispatch(self, summary):
        raise AssertionError("reached the session's dispatch: the bad input was not refused")

    monkeypatch.setattr(session.Session, "_dispatch", dispatch)
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": None, "torch": None})


@pytest.fixture
def work(tmp_path, monkeypatch):
    w = Work(tmp_path)
    for d in (w.root, w.envs, tmp_path / "home", tmp_path / "xdg"):
        d.mkdir(parents=True)
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(w.cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(w.root)
    return w


def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, mode, size, sha256) or the target of a symlink; special files are
    never opened (reading a FIFO would block)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


def check(capsys, tmp_path, argv, code, needles):
    """Run one case: the exit code, one line naming what is wrong, no traceback, nothing changed."""
    before = snapshot(tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert snapshot(tmp_path) == before, "something on disk changed"
    assert rc == code, out + err
    assert "Traceback" not in out + err and "internal error" not in out + err, out + err
    if code == 0:
        line = out
    else:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, err
        line = lines[0]
        assert code != 2 or line.startswith("error: "), line
    for n in needles:
        assert n in line, line


# --- the table ---------------------------------------------------------------------------------
# (id, setup(work) -> argv, exit code, substrings the one line must hold)

CASES = [
    # 1a. env remove / ensure: only a declared release whose directory servematrix built
    ("env-remove-dotdot", lambda w: (w.env_dir("../forged", True), ["env", "remove", "../forged"])[1],
     2, ["release '../forged'", "not a declared vLLM release", "cpu-0.32.0"]),
    ("env-remove-absolute", lambda w: (w.dir("victim/bin"), w.file("victim/" + MARKER),
                                       ["env", "remove", str(w.root / "victim")])[-1],
     2, ["victim'", "not a declared vLLM release"]),
    ("env-remove-empty", lambda w: ["env", "remove", ""], 2, ["release ''", "declared"]),
    ("env-remove-undeclared", lambda w: (w.env_dir("cpu-9.9.9", True), ["env", "remove", "cpu-9.9.9"])[1],
     2, ["release 'cpu-9.9.9'", "not a declared vLLM release"]),
    ("env-remove-current", lambda w: ["env", "remove", "current"], 2, ["release 'current'", "beside servematrix"]),
    ("env-remove-no-marker", lambda w: (w.env_dir("cpu-0.20.2", False), ["env", "remove", "cpu-0.20.2"])[1],
     2, ["envs/cpu-0.20.2", MARKER, "not removed"]),
    ("env-remove-symlink", lambda w: (w.dir("elsewhere/bin"), w.file("elsewhere/" + MARKER),
                                      w.envs.joinpath("cpu-0.21.0").symlink_to(w.root / "elsewhere"),
                                      ["env", "remove", "cpu-0.21.0"])[-1],
     2, ["envs/cpu-0.21.0", "not removed"]),
    ("env-remove-a-later-name-bad", lambda w: (w.env_dir("cpu-0.20.2", True),  # checked before any removal
                                               ["env", "remove", "cpu-0.20.2", "../x"])[1],
     2, ["release '../x'"]),
    ("env-remove-a-later-env-unmarked", lambda w: (w.env_dir("cpu-0.20.2", True), w.env_dir("cpu-0.21.0", False),
                                                   ["env", "remove", "cpu-0.20.2", "cpu-0.21.0"])[-1],
     2, ["envs/cpu-0.21.0", "not removed"]),
    ("env-ensure-a-later-name-bad", lambda w: ["env", "ensure", "current", "nope"], 2, ["release 'nope'"]),
    ("env-ensure-unknown", lambda w: ["env", "ensure", "../forged"], 2, ["release '../forged'", "declared"]),

    # 1b. run / repro --exec / bisect --out: refused before anything is written or `latest` moves
    ("run-out-holds-a-run", lambda w: (make_run(w.root, "reports/old"), w.link("reports/latest", "old"),
                                       ["run", MATRIX, "--out", "reports/old"])[-1],
     2, ["reports/old", "already holds a run", "--overwrite"]),
    ("run-out-is-a-file", lambda w: ["run", MATRIX, "--out", w.file("reports/afile")],
     2, ["reports/afile", "not a directory"]),
    ("run-out-under-a-file", lambda w: ["run", MATRIX, "--out", w.file("reports/afile") + "/run"],
     2, ["reports/afile", "not a directory"]),
    ("run-out-symlink-to-file", lambda w: (w.file("target"), ["run", MATRIX, "--out", w.link("reports/l", "../target")])[1],
     2, ["work/target", "not a directory"]),  # the run directory is resolved: the link's target is named
    ("run-out-cannot-be-created", lambda w: ["run", MATRIX, "--out", "/proc/servematrix-boundary/run"],
     2, ["/proc"]),
    ("run-latest-is-a-directory", lambda w: (w.dir("reports/latest"), w.file("reports/latest/mine"),
                                             ["run", MATRIX, "--out", "reports/new"])[-1],
     2, ["reports/latest", "not the symlink"]),
    ("run-history-beside-is-corrupt", lambda w: (w.file("reports/history.sqlite", "not sqlite at all\n" * 20),
                                                 ["run", MATRIX, "--out", "reports/new"])[1],
     2, ["reports/history.sqlite", "not a usable servematrix history database"]),
    ("repro-exec-out-holds-a-run", lambda w: (make_run(w.root, "reports/old"),
                                              ["repro", ENTRY, "--matrix", MATRIX, "--exec", "--out", "reports/old"])[1],
     2, ["reports/old", "already holds a run"]),
    ("bisect-out-holds-a-bisect", lambda w: (w.file("bis/bisect.json", "{}"),
                                             ["bisect", ENTRY, "--matrix", MATRIX, "--between", "cpu-0.20.2",
                                              "cpu-0.21.0", "--out", "bis"])[1],
     2, ["bis", "already holds a run (bisect.json)"]),
    ("bisect-out-holds-a-probe-run", lambda w: (make_run(w.root, "bis/cpu-0.21.0"),
                                                ["bisect", ENTRY, "--matrix", MATRIX, "--between", "0.20.2",
                                                 "0.21.0", "--out", "bis"])[1],
     2, ["bis/cpu-0.21.0", "already holds a run"]),
    ("bisect-out-is-a-file", lambda w: ["bisect", ENTRY, "--matrix", MATRIX, "--between", "0.20.2", "0.21.0",
                                        "--out", w.file("bisfile")],
     2, ["bisfile", "not a directory"]),
    ("bisect-between-undeclared", lambda w: ["bisect", ENTRY, "--matrix", MATRIX, "--between", "0.0.1", "0.32.0"],
     2, ["--between", "'0.0.1'", "cpu-0.18.1", "cpu-0.32.0"]),

    # 1c. reference record --out: no special target, no overwriting what does not parse, nothing
    # written when there is nothing to record
    ("ref-out-is-a-directory", lambda w: (make_run(w.root, "r"), w.dir("refs"),
                                          ["reference", "record", "r", "--out", "refs"])[-1],
     2, ["refs", "a directory", "not overwritten"]),
    ("ref-out-symlink-to-directory", lambda w: (make_run(w.root, "r"), w.dir("d"),
                                                ["reference", "record", "r", "--out", w.link("refs.yaml", "d")])[-1],
     2, ["refs.yaml", "a directory (through a symlink)"]),
    ("ref-out-is-a-fifo", lambda w: (make_run(w.root, "r"), os.mkfifo(w.root / "fifo"),
                                     ["reference", "record", "r", "--out", "fifo"])[-1],
     2, ["fifo", "a FIFO"]),
    ("ref-out-symlink-to-device", lambda w: (make_run(w.root, "r"),
                                             ["reference", "record", "r", "--out", w.link("null.yaml", "/dev/null")])[-1],
     2, ["null.yaml", "a device"]),
    ("ref-out-dangling-symlink", lambda w: (make_run(w.root, "r"),
                                            ["reference", "record", "r", "--out", w.link("gone.yaml", "missing/x.yaml")])[-1],
     2, ["gone.yaml", "symlink to a missing file"]),
    ("ref-existing-malformed-yaml", lambda w: (make_run(w.root, "r"), w.file("refs.yaml", "references: [\n  - {a: 1\n"),
                                               ["reference", "record", "r", "--out", "refs.yaml"])[-1],
     2, ["refs.yaml", "existing references do not parse", "not overwritten"]),
    ("ref-existing-foreign-yaml", lambda w: (make_run(w.root, "r"), w.file("refs.yaml", "name: my notes\n"),
                                             ["reference", "record", "r", "--out", "refs.yaml"])[-1],
     2, ["refs.yaml", "do not parse", "name"]),
    ("ref-nothing-to-record", lambda w: (make_run(w.root, "r", None, record(verdict="fail")),
                                         w.file("refs.yaml", "# mine, keep me\nreferences: []\n"),
                                         ["reference", "record", "r", "--out", "refs.yaml"])[-1],
     1, ["nothing recorded"]),

    # 1d. history: read-only; never creates or changes the database
    ("history-default-db-missing", lambda w: ["history"], 0, ["no history yet"]),
    ("history-named-db-missing", lambda w: ["history", "--db", "reports/histroy.sqlite"],  # a typo: as gate --db
     2, ["--db", "reports/histroy.sqlite", "no such history database"]),
    ("history-valid-db-unchanged", lambda w: (make_history(w.root / "reports" / "history.sqlite"),
                                              ["history", "--db", "reports/history.sqlite"])[1],
     0, ["a/tp1-pp1-fp32: pass"]),
    ("history-corrupt-db", lambda w: ["history", "--db", w.file("h.sqlite", "garbage " * 100)],
     2, ["h.sqlite", "not a usable servematrix history database", "file is not a database"]),
    ("history-foreign-sqlite", lambda w: (sqlite3.connect(w.root / "f.sqlite").execute("CREATE TABLE x (y)").connection.commit(),
                                          ["history", "--db", "f.sqlite"])[1],
     2, ["f.sqlite", "no such table"]),
    ("history-db-is-a-directory", lambda w: ["history", "--db", w.dir("hdir")], 2, ["hdir", "not a file"]),
    ("history-last-zero", lambda w: ["history", "--last", "0"], 2, ["--last", ">= 1"]),
    ("diff-history-untouched-on-bad-run", lambda w: (make_history(w.root / "history.sqlite"),
                                                     ["diff", "nope", "nope2"])[1],
     2, ["nope", "no such directory"]),

    # 3. gate arguments
    *[(f"gate-{flag}-{bad}", lambda w, flag=flag, bad=bad: ["gate", make_run(w.root, "r"), f"--{flag}", bad],
       2, [f"--{flag}", "from 0 to 1", repr(bad)])
      for flag in ("min-load-rate", "min-accuracy-rate") for bad in ("nan", "5", "-1", "inf", "abc")],

    # 4. other arguments
    *[(f"run-gpus-{bad}", lambda w, bad=bad: ["run", MATRIX, "--gpus", bad], 2, ["--gpus", repr(bad)])
      for bad in ("abc", "-1", "0,0", "1,x", "٣")],
    *[(f"{cmd[0]}-limit-{bad}", lambda w, cmd=cmd, bad=bad: [*cmd, "--limit", bad], 2, ["--limit", ">= 1"])
      for cmd in (["run", MATRIX], ["repro", ENTRY]) for bad in ("0", "-1", "x")],
    *[(f"run-startup-timeout-{bad}", lambda w, bad=bad: ["run", MATRIX, "--startup-timeout", bad],
       2, ["--startup-timeout", "> 0"]) for bad in ("nan", "inf", "0", "-1")],
    ("run-retries-negative", lambda w: ["run", MATRIX, "--retries", "-1"], 2, ["--retries", ">= 0"]),
    *[(f"repro-port-{bad}", lambda w, bad=bad: ["repro", ENTRY, "--port", bad], 2, ["--port", "1 to 65535"])
      for bad in ("0", "65536", "-1", "http")],
    ("bisect-log-lines-negative", lambda w: ["bisect", ENTRY, "--between", "a", "b", "--log-lines", "-1"],
     2, ["--log-lines"]),
    ("run-k-matches-nothing", lambda w: ["run", MATRIX, "-k", "no-such-scenario"], 2, ["-k", "no-such-scenario"]),
    ("run-inject-unknown", lambda w: ["run", MATRIX, "--inject", "no-such-fix"], 2, ["--inject", "no-such-fix"]),
    ("unknown-command", lambda w: ["frobnicate"], 2, ["invalid choice", "frobnicate"]),
    ("gsm8k-task-onto-a-file", lambda w: ["gsm8k-task", w.file("taskfile")], 2, ["taskfile", "not a directory"]),
    ("gsm8k-task-task-is-a-file", lambda w: ["gsm8k-task", w.file("tdir/task").rsplit("/", 1)[0]],
     2, ["tdir/task", "not a directory"]),
    ("gsm8k-task-negative-fewshot", lambda w: ["gsm8k-task", "t", "--num-fewshot", "-1"], 2, ["--num-fewshot"]),
    ("gsm8k-task-more-fewshot-than-shipped", lambda w: ["gsm8k-task", "t", "--num-fewshot", "9"],
     2, ["--num-fewshot", "at most 8"]),
    ("run-out-empty", lambda w: ["run", MATRIX, "--out", ""], 2, ["--out", "a directory path"]),
    ("run-python-missing", lambda w: ["run", MATRIX, "--python", "/no/such/python"], 2, ["--python", "/no/such/python"]),
    ("bisect-python-missing", lambda w: ["bisect", ENTRY, "--between", "a", "b", "--python", "nopython3.99"],
     2, ["--python", "nopython3.99"]),
]


@pytest.mark.parametrize("setup, code, needles", [pytest.param(s, c, n, id=i) for i, s, c, n in CASES])
def test_boundary(work, capsys, setup, code, needles):
    argv = setup(work)
    check(capsys, work.tmp, argv, code, needles)


def test_run_out_in_a_read_only_directory_is_refused_up_front(work, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0555 directory; the /proc case covers an uncreatable --out")
    ro = work.root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        check(capsys, work.tmp, ["run", MATRIX, "--out", "ro/run"], 2, ["ro", "not writable"])
    finally:
        ro.chmod(0o755)


# --- 2. damaged summaries, through every command that reads one --------------------------------

DAMAGE = {
    "missing-dir": (None, ["no such directory"]),
    "a-file": ("FILE", ["not a directory"]),
    "no-summary": ("EMPTYDIR", ["summary.json", "missing"]),
    "truncated": ('{"schema_version": 1, "matrix": "m", "scen', ["summary.json", "not valid JSON", "line 1"]),
    "empty": ("", ["summary.json", "not valid JSON"]),
    "binary": (b"\xff\xfe\x00garbage", ["summary.json", "not text"]),
    "json-list": ("[1, 2, 3]", ["summary.json", "not a servematrix summary"]),
    "foreign-json": ('{"name": "left-pad", "version": "1.3.0"}', ["summary.json", "not a servematrix summary"]),
    "unknown-schema": ('{"schema_version": 99, "matrix": "m"}', ["summary.json", "schema_version 99", "known: 1"]),
    "schema-as-text": ('{"schema_version": "1"}', ["summary.json", "schema_version '1'"]),
    "bad-field": (None, ["summary.json", "scenarios[0].verdict", "Input should be"]),
    "missing-field": ('{"schema_version": 1, "run_dir": "x", "host": "h", "vllm_version": null, '
                      '"torch_version": null, "servematrix_version": "0", "started_at": "t"}',
                      ["summary.json", "matrix", "Field required"]),
}

READERS = {
    "gate": lambda bad, good: ["gate", bad],
    "gate-baseline": lambda bad, good: ["gate", good, "--baseline", bad],
    "diff-a": lambda bad, good: ["diff", bad, good],
    "diff-b": lambda bad, good: ["diff", good, bad],
    "reference-record": lambda bad, good: ["reference", "record", bad, "--out", "refs.yaml"],
}


def damaged_run(w: Work, kind: str) -> str:
    text, _ = DAMAGE[kind]
    if kind == "missing-dir":
        return "no-such-run"
    if text == "FILE":
        return w.file("runfile")
    if text == "EMPTYDIR":
        return w.dir("emptyrun")
    if kind == "bad-field":
        good = summary_json(w.root / "bad", record())
        return make_run(w.root, "bad", good.replace('"verdict": "pass"', '"verdict": "maybe"'))
    return make_run(w.root, "bad", text)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_summary_is_one_line_naming_it(work, capsys, reader, kind):
    good = make_run(work.root, "good")
    work.file("refs.yaml", "references: []\n")
    bad = damaged_run(work, kind)
    check(capsys, work.tmp, READERS[reader](bad, good), 2, [bad, *DAMAGE[kind][1]])


# --- 3. the gate never ships what it did not judge ---------------------------------------------

@pytest.mark.parametrize("records, why", [
    ((), "nothing to judge: the run holds no scenario"),
    ((record("a/x", "skipped"), record("b/x", "skipped")), "nothing to judge: every scenario was skipped"),
], ids=["zero-scenarios", "all-skipped"])
def test_gate_cannot_judge_a_run_that_judged_nothing(work, capsys, records, why):
    d = work.root / "r"
    d.mkdir()
    (d / "summary.json").write_text(summary_json(d, *records))
    before = snapshot(work.tmp)
    rc = main(["gate", "r"])
    out, err = capsys.readouterr()
    assert rc == 2 and why in out and "verdict: CANNOT JUDGE (exit 2)" in out, out + err
    assert snapshot(work.tmp) == before


def test_a_valid_run_still_ships_and_a_skipped_entry_is_not_a_load_failure(work, capsys):
    make_run(work.root, "r", None, record("a/x"), record("b/x", "skipped"))
    assert main(["gate", "r"]) == 0, capsys.readouterr()


# --- 1d. a locked history: readers fail fast, naming the file --------------------------------

def test_a_locked_history_fails_fast_instead_of_hanging(work, capsys):
    db = make_history(work.root / "reports" / "history.sqlite")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        check(capsys, work.tmp, ["history", "--db", "reports/history.sqlite"], 2,
              ["reports/history.sqlite", "locked by another process"])
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        check(capsys, work.tmp, ["run", MATRIX, "--out", "reports/new"], 2, ["history.sqlite", "locked"])
        assert time.monotonic() - t0 < 5
    finally:
        holder.rollback()
        holder.close()


# --- what is still allowed ---------------------------------------------------------------------

def test_env_remove_deletes_a_declared_environment_servematrix_built(work, capsys):
    d = work.env_dir("cpu-0.20.2", marker=True)
    assert main(["env", "remove", "cpu-0.20.2"]) == 0
    assert "cpu-0.20.2: removed" in capsys.readouterr().out and not d.exists()
    assert main(["env", "remove", "cpu-0.20.2"]) == 0
    assert "cpu-0.20.2: not built" in capsys.readouterr().out


def test_overwrite_lets_a_run_directory_that_holds_a_run_be_claimed(work):
    from servematrix.run import rundir

    make_run(work.root, "reports/old")
    rundir.claim(work.root / "reports" / "old", overwrite=True)
    rundir.claim(work.root / "reports" / "fresh" / "run")
    assert (work.root / "reports" / "fresh" / "run").is_dir()
