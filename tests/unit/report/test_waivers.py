"""Waivers that expire: `until:` (a date or a release) validated where it is written; a waiver is
expired once its date has passed or its entry runs at/after the release, stale when its bug's fix
module reports already-fixed on that release or it xpassed in the last N runs, active otherwise."""

import datetime
import textwrap

import pytest

from servematrix.config.matrix import load_matrix
from servematrix.config.yamlio import ConfigError
from servematrix.record import FixRecord, RunSummary, ScenarioRecord
from servematrix.report import history, waivers
from servematrix.report.waivers import Evidence, Waiver, judge

from ..config.test_matrix import SCENARIO

BUG = "https://github.com/vllm-project/vllm/pull/38191"  # minimax-k-norm-38191's pr
TODAY = datetime.date(2027, 1, 31)


def waiver(**kw):
    base = dict(id="m/tp2-pp1-fp32-cpu-0.20.2", release="cpu-0.20.2", reason="r", bug=BUG)
    return Waiver(**{**base, **kw})


def ev(**kw):
    return Evidence(today=TODAY, **kw)


def test_a_date_until_expires_the_day_after_it():
    assert judge(waiver(until="2027-01-31"), ev()).state == "active"  # through the day it names
    assert judge(waiver(until="2027-02-01"), ev()).state == "active"
    s = judge(waiver(until="2027-01-30"), ev())
    assert s.state == "expired" and s.why == ["until 2027-01-30 has passed (today is 2027-01-31)"]


def test_a_release_until_expires_at_and_after_that_release():
    assert judge(waiver(until="cpu-0.21.0"), ev()).state == "active"
    assert judge(waiver(until="cpu-0.20.2"), ev()).why == ["runs on cpu-0.20.2, at or after until cpu-0.20.2"]
    assert judge(waiver(until="cpu-0.18.1"), ev()).state == "expired"
    # release order is numeric, not text: 0.9 < 0.20
    assert judge(waiver(release="cpu-0.9.0", until="cpu-0.20.2"), ev()).state == "active"


def test_current_is_ordered_by_the_version_it_ran_and_unknown_is_not_guessed():
    cur = dict(release="current", until="cpu-0.32.0")
    assert judge(waiver(version="0.32.0+cpu", **cur), ev()).why == \
        ["runs on current (vLLM 0.32.0+cpu), at or after until cpu-0.32.0"]
    assert judge(waiver(version="0.31.9", **cur), ev()).state == "active"
    assert judge(waiver(version=None, **cur), ev()).state == "active"


def test_the_bugs_fix_module_reporting_already_fixed_on_that_release_makes_it_stale():
    assert waivers.fix_modules_for(BUG) == ["minimax-k-norm-38191"]
    assert waivers.fix_modules_for(BUG + "/") == ["minimax-k-norm-38191"]
    assert waivers.fix_modules_for("https://example.com/1") == [] and waivers.fix_modules_for(None) == []
    fixed = ("cpu-0.20.2", "minimax-k-norm-38191", "already-fixed", "x in run1")
    s = judge(waiver(), ev(fix_reports=[fixed]))
    assert s.state == "stale" and "minimax-k-norm-38191 reports already-fixed on cpu-0.20.2 (x in run1)" in s.why[0]
    # applied (the bug is there), or already-fixed on another release: still active
    assert judge(waiver(), ev(fix_reports=[("cpu-0.20.2", "minimax-k-norm-38191", "applied", "x")])).state == "active"
    assert judge(waiver(), ev(fix_reports=[("cpu-0.32.0", "minimax-k-norm-38191", "already-fixed", "x")])).state \
        == "active"
    assert judge(waiver(), ev(fix_reports=[("cpu-0.20.2", "cpu-moe-silu", "already-fixed", "x")])).state == "active"


def test_an_xpass_in_the_last_n_runs_makes_it_stale_and_an_older_one_does_not():
    rows = [{"verdict": v, "started_at": f"2027-01-0{i + 1}"} for i, v in enumerate(["xpass", "xfail", "xfail"])]
    w = waiver()
    assert judge(w, ev(results={w.id: rows}, last=2)).state == "active"
    s = judge(w, ev(results={w.id: rows}, last=3))
    assert s.state == "stale" and s.why == ["xpassed in 1 of its last 3 runs (latest 2027-01-01): the bug did not "
                                            "reproduce"]


def test_a_non_strict_waiver_that_passes_is_stale_and_a_strict_ones_pass_is_not_counted_as_an_xpass():
    rows = [{"verdict": "pass", "started_at": "2027-01-01"}, {"verdict": "xfail", "started_at": "2027-01-02"}]
    loose, strict = waiver(strict=False), waiver()
    assert judge(loose, ev(results={loose.id: rows})).state == "stale"
    # a strict xfail records a pass as "xpass"; a plain "pass" row there is another entry's doing
    assert judge(strict, ev(results={strict.id: rows})).state == "active"


def test_expired_outranks_stale_and_both_reasons_are_kept():
    fixed = ("cpu-0.20.2", "minimax-k-norm-38191", "already-fixed", "x")
    s = judge(waiver(until="2026-01-01"), ev(fix_reports=[fixed]))
    assert s.state == "expired" and len(s.why) == 2 and waivers.stale([s]) == [s]


def _run(tmp_path, name, started, *records):
    return RunSummary(matrix="m", run_dir=str(tmp_path / name), host="h", vllm_version="0.32.0+cpu",
                      torch_version="t", servematrix_version="0", started_at=started, status="complete",
                      scenarios=list(records))


def _rec(id_, verdict, vllm="cpu-0.20.2", expect=None, fixes=()):
    return ScenarioRecord(id=id_, scenario="m", model="m", tp=2, pp=1, quant="fp32", vllm=vllm, device="cpu",
                          expect=expect or {"expect": "pass"}, verdict=verdict, fixes=list(fixes),
                          started_at="t", seconds=1)


def test_fix_reports_and_xpasses_come_from_the_run_and_the_history(tmp_path):
    xf = {"expect": "xfail", "reason": "r", "bug": BUG, "until": "cpu-0.33.0"}
    fixed = FixRecord(name="minimax-k-norm-38191", status="already-fixed", pid=1)
    db = tmp_path / "history.sqlite"
    history.append(_run(tmp_path, "r1", "2027-01-01", _rec("m/w", "xfail", expect=xf),
                        _rec("m/fix", "pass", fixes=[fixed])), db)
    rows = history.trend(db)
    assert rows["m/fix"][0]["release"] == "cpu-0.20.2" and rows["m/fix"][0]["fixes"][0]["status"] == "already-fixed"
    now = _run(tmp_path, "r2", "2027-01-02", _rec("m/w", "xpass", expect=xf))
    found = waivers.from_run(now)
    assert [(w.id, w.until, w.version) for w in found] == [("m/w", "cpu-0.33.0", "0.32.0+cpu")]
    from_history = waivers.fix_reports_of(None, rows)
    assert from_history == [("cpu-0.20.2", "minimax-k-norm-38191", "already-fixed", f"m/fix in {tmp_path / 'r1'}")]
    (s,) = waivers.judge_all(found, ev(fix_reports=waivers.fix_reports_of(now, rows), results=rows))
    assert s.state == "stale" and len(s.why) == 1  # the history's xfail is no xpass; the fix report is
    # the run's own xpass counts once it is in the history
    history.append(now, db)
    (s,) = waivers.judge_all(found, ev(results=history.trend(db)))
    assert s.state == "stale" and "xpassed in 1 of its last 2 runs" in s.why[0]


# --- the matrix field ------------------------------------------------------------------------------
def _matrix(write, include: str):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    return write("matrix/m.yaml", "name: m\ninclude:\n" + textwrap.indent(textwrap.dedent(include), "  "))


XFAIL = "- scenario: alpha\n  expect: xfail\n  reason: r\n  bug: https://github.com/x/y/pull/1\n"


@pytest.mark.parametrize("value, kept", [("2027-01-31", "2027-01-31"), ('"2027-01-31"', "2027-01-31"),
                                         ("cpu-0.33.0", "cpu-0.33.0"), ("cpu-0.18.1", "cpu-0.18.1")])
def test_until_is_a_date_or_a_release_of_a_declared_family(write, value, kept):
    m = load_matrix(_matrix(write, XFAIL + f"  until: {value}\n"))
    assert m.entries[0].expectation.until == kept
    assert waivers.from_entries(m.entries)[0].until == kept


@pytest.mark.parametrize("value, says", [
    ('"2027-02-30"', "not a calendar date"),
    ("2027-01-31 10:00:00", "without a time"),
    ("gpu-0.33.0", "of a declared family (cpu-X.Y.Z"),
    ("soon", "expected a date (YYYY-MM-DD) or a release"),
    ("12", "a date (YYYY-MM-DD) or a release"),
])
def test_a_bad_until_names_file_line_and_field(write, value, says):
    path = _matrix(write, XFAIL + f"  until: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_matrix(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 7, "include.0.until") and says in err.message


def test_an_unquoted_impossible_date_is_refused_by_the_yaml_reader_at_its_line(write):
    with pytest.raises(ConfigError) as info:
        load_matrix(_matrix(write, XFAIL + "  until: 2027-02-30\n"))
    assert info.value.line == 7 and "day is out of range" in info.value.message


def test_until_on_an_entry_expected_to_pass_is_refused(write):
    with pytest.raises(ConfigError) as info:
        load_matrix(_matrix(write, "- scenario: alpha\n  until: 2027-01-31\n"))
    assert "until only make sense with expect: xfail" in str(info.value).replace("reason/signature/", "")


def test_an_expectation_rule_carries_until_to_every_entry_it_matches(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    path = write("matrix/m.yaml", textwrap.dedent("""\
        name: m
        scenarios: [alpha]
        axes: {tp: [1, 2]}
        expectations:
          - match: {tp: 2}
            expect: xfail
            reason: r
            bug: https://github.com/x/y/pull/1
            until: 2026-01-01
        """))
    states = waivers.judge_all(waivers.from_entries(load_matrix(path).entries), ev())
    assert [(s.waiver.id, s.state) for s in states] == [("alpha/tp2-pp1-fp32", "expired")]


def test_current_is_told_apart_by_the_vllm_version_each_report_was_made_on():
    fixed_on = lambda v: (waivers.on("current", v), "minimax-k-norm-38191", "already-fixed", "x")  # noqa: E731
    w = waiver(release="current", version="0.33.0+cpu")
    assert judge(w, ev(fix_reports=[fixed_on("0.32.0+cpu")])).state == "active"  # another vLLM then
    s = judge(w, ev(fix_reports=[fixed_on("0.33.0")]))
    assert s.state == "stale" and "already-fixed on current@0.33.0" in s.why[0]
    # a waiver whose current version is unknown takes a report on any current
    assert judge(waiver(release="current"), ev(fix_reports=[fixed_on("0.32.0")])).state == "stale"
