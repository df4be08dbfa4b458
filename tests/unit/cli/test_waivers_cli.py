"""`servematrix waivers` lists every waiver of the matrix files with its state, from the history;
`gate --fail-on-stale-waivers` exits 1 on a stale one and `gate --history N` reads verdicts
through hysteresis — through the command line, as a user runs them."""

import textwrap

from servematrix.cli import main
from servematrix.record import FixRecord, RunSummary, ScenarioRecord
from servematrix.report import history

from ..config.test_matrix import SCENARIO

BUG = "https://github.com/vllm-project/vllm/pull/38191"  # minimax-k-norm-38191 backports it
XF = {"expect": "xfail", "reason": "k_norm sharded by TP", "bug": BUG}


def matrix(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    return write("matrix/m.yaml", textwrap.dedent(f"""\
        name: m
        include:
          - {{scenario: alpha, tp: 2, vllm: cpu-0.20.2, expect: xfail, reason: r, bug: "{BUG}"}}
          - {{scenario: alpha, tp: 4, vllm: cpu-0.20.2, expect: xfail, reason: r, bug: "{BUG}", until: cpu-0.18.1}}
          - {{scenario: alpha, pp: 2, expect: xfail, reason: r, bug: "https://github.com/x/y/pull/1", until: 2099-01-01}}
          - {{scenario: alpha, pp: 3, expect: xfail, reason: r, bug: "https://github.com/x/y/pull/2"}}
        """))


def rec(id_, verdict, expect=None, vllm="cpu-0.20.2", fixes=(), tp=2):
    return ScenarioRecord(id=id_, scenario="alpha", model="alpha", tp=tp, pp=1, quant="fp32", vllm=vllm,
                          device="cpu", expect=expect or {"expect": "pass"}, verdict=verdict, fixes=list(fixes),
                          started_at="t", seconds=1)


def summary(run_dir, started, *records):
    return RunSummary(matrix="m", run_dir=str(run_dir), host="h", vllm_version="0.32.0+cpu", torch_version="t",
                      servematrix_version="0", started_at=started, status="complete", scenarios=list(records),
                      selected=[r.id for r in records])


def write_run(path, s):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(s.model_dump_json())
    return str(path)


def test_waivers_lists_every_waiver_with_its_state_from_the_history(write, tmp_path, capsys):
    m = matrix(write)
    db = tmp_path / "reports" / "history.sqlite"
    db.parent.mkdir()
    fixed = FixRecord(name="minimax-k-norm-38191", status="already-fixed", pid=1)
    history.append(summary(tmp_path / "reports" / "r1", "2026-11-01",
                           rec("alpha/tp2-pp1-fp32-cpu-0.20.2+minimax-k-norm-38191", "pass", fixes=[fixed]),
                           rec("alpha/tp1-pp3-fp32", "xpass", XF, vllm="current", tp=1)), db)
    assert main(["waivers", str(m), "--history", str(db)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("alpha/")}
    assert "stale" in lines["alpha/tp2-pp1-fp32-cpu-0.20.2"] and \
        "minimax-k-norm-38191 reports already-fixed on cpu-0.20.2" in lines["alpha/tp2-pp1-fp32-cpu-0.20.2"]
    assert "expired" in lines["alpha/tp4-pp1-fp32-cpu-0.20.2"] and \
        "runs on cpu-0.20.2, at or after until cpu-0.18.1" in lines["alpha/tp4-pp1-fp32-cpu-0.20.2"]
    assert "active" in lines["alpha/tp1-pp2-fp32"] and "2099-01-01" in lines["alpha/tp1-pp2-fp32"]
    assert "stale" in lines["alpha/tp1-pp3-fp32"] and "xpassed in 1 of its last 1 runs" in lines["alpha/tp1-pp3-fp32"]
    assert "active: 1, stale: 2, expired: 1" in out and f"{m}:" in out  # each waiver's file:line


def test_waivers_without_history_says_so_and_a_named_missing_database_is_refused(write, tmp_path, capsys,
                                                                                monkeypatch):
    m = matrix(write)
    monkeypatch.chdir(tmp_path)
    assert main(["waivers", str(m)]) == 0
    assert "no history in reports/history.sqlite: xpasses and fix reports not consulted" in capsys.readouterr().out
    assert main(["waivers", str(m), "--history", "nope.sqlite"]) == 2
    assert capsys.readouterr().err == "error: --history: nope.sqlite: no such history database\n"
    assert main(["waivers", str(m), "--last", "0"]) == 2
    assert "--last: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_a_bad_until_is_exit_2_and_one_line_naming_file_line_and_field(write, capsys):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    m = write("matrix/m.yaml", "name: m\ninclude:\n  - {scenario: alpha, expect: xfail, reason: r, "
                               "bug: 'https://x.y/1', until: next-week}\n")
    assert main(["waivers", str(m)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {m}:3: include.0.until: ") and "got 'next-week'" in err and err.count("\n") == 1


def test_gate_fails_on_stale_waivers_only_when_told_to(tmp_path, capsys):
    until = {**XF, "until": "2026-01-01"}  # a date that has passed
    run = write_run(tmp_path / "reports" / "r1", summary(tmp_path / "reports" / "r1", "2026-11-01",
                                                         rec("alpha/tp2-pp1-fp32", "xfail", until)))
    assert main(["gate", run]) == 0
    out = capsys.readouterr().out
    assert "waiver alpha/tp2-pp1-fp32 [expired] until 2026-01-01: until 2026-01-01 has passed" in out
    assert main(["gate", run, "--fail-on-stale-waivers"]) == 1
    out = capsys.readouterr().out
    assert "regressions:\n  - waiver alpha/tp2-pp1-fp32 [expired]" in out and "verdict: REGRESSION (exit 1)" in out


def test_gate_history_holds_one_flaky_miss_and_counts_the_second(tmp_path, capsys):
    reports = tmp_path / "reports"
    reports.mkdir()
    db = reports / "history.sqlite"
    for i, verdict in enumerate(["pass", "fail", "pass"]):
        history.append(summary(reports / f"r{i}", f"2026-11-0{i + 1}", rec("alpha/tp2-pp1-fp32", verdict)), db)
    flaky = summary(reports / "r3", "2026-11-04", rec("alpha/tp2-pp1-fp32", "fail"))
    history.append(flaky, db)  # as the run itself does before anyone gates it
    run = write_run(reports / "r3", flaky)
    assert main(["gate", run]) == 1
    capsys.readouterr()
    assert main(["gate", run, "--history", "10"]) == 0
    out = capsys.readouterr().out
    assert "alpha/tp2-pp1-fp32: ok after 4 judged runs (pass fail pass fail); flake rate 3/4 = 0.75" in out
    again = summary(reports / "r4", "2026-11-05", rec("alpha/tp2-pp1-fp32", "fail"))
    history.append(again, db)
    assert main(["gate", write_run(reports / "r4", again), "--history", "10", "--db", str(db)]) == 1
    assert "broken after 5 judged runs" in capsys.readouterr().out


def test_gate_history_arguments_are_checked(tmp_path, capsys):
    run = write_run(tmp_path / "r", summary(tmp_path / "r", "t", rec("alpha/tp2-pp1-fp32", "pass")))
    assert main(["gate", run, "--history", "0"]) == 2
    assert "--history: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    assert main(["gate", run, "--history", "3", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert capsys.readouterr().err == f"error: --db: {tmp_path / 'none.sqlite'}: no such history database\n"
