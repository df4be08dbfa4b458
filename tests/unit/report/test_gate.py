"""`gate` decisions: ship, regression, cannot judge; rates, baselines and waivers."""

import pytest

from servematrix.check.accuracy import judge
from servematrix.config.references import Check, RefKey, Reference
from servematrix.record import MetricValue
from servematrix.errors import StateError
from servematrix.record import Failure
from servematrix.report.gate import decide, load_summary
from servematrix.config.matrix import Expectation
from servematrix.record import LoadResult, RunSummary, ScenarioRecord

XFAIL = Expectation(expect="xfail", reason="r", bug="https://github.com/vllm-project/vllm/pull/1")


def rec(id_, verdict="pass", ok=True, failure=None, expect=Expectation(), accuracy=()):
    return ScenarioRecord(id=id_, scenario=id_.split("/")[0], model="m", tp=1, pp=1, quant="fp32", vllm="current",
                          device="cpu", expect=expect, verdict=verdict, failure=failure,
                          load=LoadResult(ok=ok), accuracy=list(accuracy), started_at="t", seconds=1)


def run(*records, status="complete", selected=None):
    return RunSummary(matrix="m", run_dir="/r", host="h", vllm_version="0.32.0", torch_version="t",
                      servematrix_version="0", started_at="t", status=status, scenarios=list(records),
                      selected=selected if selected is not None else [r.id for r in records])


def test_clean_run_ships():
    assert decide(run(rec("a/x"), rec("b/x", "xfail", False, expect=XFAIL))).exit_code == 0


def test_a_failing_scenario_is_a_regression():
    d = decide(run(rec("a/x"), rec("b/x", "fail", False, Failure.of("exception", "KeyError: 'k_scale'"))))
    assert d.exit_code == 1 and "KeyError" in d.regressions[0]


def test_infrastructure_errors_cannot_be_judged_and_are_not_regressions():
    d = decide(run(rec("a/x"), rec("b/x", "error", False, Failure.of("oom", "killed by SIGKILL"))))
    assert d.exit_code == 2 and d.regressions == [] and d.load_rate == 1.0


def test_an_interrupted_run_or_a_scenario_that_never_ran_cannot_be_judged():
    assert decide(run(rec("a/x"), status="interrupted")).exit_code == 2
    assert decide(run(rec("a/x"), selected=["a/x", "b/x"])).exit_code == 2


def test_missing_against_the_baseline_and_newly_failing_against_it():
    base = run(rec("a/x"), rec("b/x"))
    assert decide(run(rec("a/x")), base).exit_code == 2
    d = decide(run(rec("a/x"), rec("b/x", "fail", False)), base)
    assert d.exit_code == 1 and any("newly failing" in r for r in d.regressions)


def test_minimum_load_rate_is_enforced():
    r = run(rec("a/x"), rec("b/x", "fail", False))
    assert decide(r, min_load_rate=0.5).load_rate == 0.5
    assert any("load success rate" in x for x in decide(r, min_load_rate=0.9).regressions)


def test_accuracy_rate_counts_only_checks_with_a_reference():
    ref = Reference(key=RefKey(scenario="a", quant="fp32"), metric="gsm8k.agreement", mean=0.9, sigma=0.3, n=100)
    check = Check(metric="gsm8k.agreement", effect=0.1)
    bad = judge(check, MetricValue(mean=0.5, sigma=0.5, stderr=0.05, n=100), ref)
    none = judge(check, MetricValue(mean=0.5, sigma=0.5, stderr=0.05, n=100), None)
    assert (bad.status, none.status) == ("fail", "no-reference")
    d = decide(run(rec("a/x", accuracy=[bad, none])), min_accuracy_rate=0.5)
    assert d.accuracy_rate == 0.0 and d.exit_code == 1


def test_a_check_against_a_reference_of_another_protocol_cannot_be_judged():
    from servematrix.record import CheckResult

    nc = CheckResult(metric="gsm8k.nll", status="not-comparable", effect=0.25, alpha=0.05, beta=0.2,
                     note="n 24 → 16")
    d = decide(run(rec("a/x", accuracy=[nc])))
    assert d.exit_code == 2 and any("not comparable with its reference (n 24 → 16)" in c for c in d.cannot_judge)


def test_a_baseline_without_fingerprints_is_compared_and_the_gate_says_so():
    from servematrix.record import Gsm8kResult

    def with_gsm8k(r):
        return r.model_copy(update={"gsm8k": Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=24, seconds=1.0)})

    d = decide(run(with_gsm8k(rec("a/x"))), baseline=run(with_gsm8k(rec("a/x"))))
    assert d.exit_code == 0 and any("no fingerprint" in f for f in d.flags), d.flags


def test_xpass_is_flagged_to_drop_the_waiver():
    d = decide(run(rec("a/x", "xpass", expect=XFAIL)))
    assert any("drop the waiver" in f for f in d.flags)


def test_a_complete_run_without_scenarios_has_nothing_to_judge():
    d = decide(run())
    assert d.exit_code == 2 and d.cannot_judge == ["nothing to judge: the run holds no scenario"]


def test_a_run_whose_every_entry_was_skipped_cannot_be_judged_not_a_regression():
    d = decide(run(rec("a/x", "skipped", False), rec("b/x", "skipped", False)))
    assert d.exit_code == 2 and d.regressions == [] and "every scenario was skipped" in d.cannot_judge[0]
    assert d.load_rate is None  # a skipped entry never ran: it is no load failure


def test_a_skipped_entry_beside_a_passing_one_does_not_lower_the_load_rate():
    d = decide(run(rec("a/x"), rec("b/x", "skipped", False)))
    assert (d.exit_code, d.load_rate) == (0, 1.0)


def _summary_file(tmp_path, text):
    (tmp_path / "summary.json").write_text(text)
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ('{"schema_version": 1, "matr', "not valid JSON at line 1 column"),
    ('{"hello": "world"}', "not a servematrix summary"),
    ('{"schema_version": 2, "matrix": "m"}', "schema_version 2 is not one this servematrix reads (known: 1)"),
    ('{"schema_version": 1, "matrix": "m"}', "not a valid servematrix summary: run_dir: Field required (and "),
])
def test_load_summary_names_the_file_and_what_is_wrong(tmp_path, text, message):
    with pytest.raises(StateError) as exc:
        load_summary(_summary_file(tmp_path, text))
    assert str(exc.value).startswith(f"{tmp_path / 'summary.json'}: ") and message in str(exc.value)


def test_load_summary_reads_back_what_the_report_writes(tmp_path):
    r = run(rec("a/x"))
    assert load_summary(_summary_file(tmp_path, r.model_dump_json())) == r


# --- hysteresis (gate --history N) -------------------------------------------------------------------
from servematrix.report.gate import render, standings  # noqa: E402
from servematrix.report.history import standing  # noqa: E402
from servematrix.report.waivers import Waiver, WaiverState  # noqa: E402


@pytest.mark.parametrize("verdicts, state", [
    (["pass", "fail"], "ok"),  # one flaky night does not flip it
    (["pass", "fail", "fail"], "broken"),  # 2 distinct runs in a row
    (["fail", "pass", "fail", "pass", "fail"], "ok"),  # never twice in a row: flaky, not broken
    (["fail", "fail", "pass", "pass"], "broken"),  # one good night does not clear it
    (["fail", "fail", "pass", "pass", "pass"], "ok"),  # 3 clean ones do
    (["fail", "error", "fail"], "broken"),  # an infrastructure error neither counts nor breaks the streak
    (["pass", "error", "error", "skipped"], "ok"),
    (["fail", "fail", "error", "error", "error"], "broken"),  # errors never clear it either
    (["xfail", "xpass", "xpass"], "broken"),  # an xpass misses the expectation like a fail
])
def test_standing_follows_the_two_to_break_three_to_fix_rule(verdicts, state):
    assert standing(verdicts).state == state


def test_flake_rate_is_flips_over_judged_runs_with_a_wilson_interval():
    st = standing(["pass", "fail", "error", "pass", "fail"])
    assert (st.runs, st.flips, st.flake) == (4, 3, 0.75)
    assert st.flake_low == pytest.approx(0.3006, abs=1e-3) and st.flake_high == pytest.approx(0.9544, abs=1e-3)
    assert "flake rate 3/4 = 0.75 [0.30, 0.95]" in st.describe()
    assert standing(["error"]).flake is None and standing(["error"]).runs == 0


def hist(*verdicts, id_="a/x"):
    return {id_: [{"verdict": v, "run_dir": f"/old{i}", "started_at": f"s{i}"} for i, v in enumerate(verdicts)]}


def started(r, at="t"):
    return r.model_copy(update={"started_at": at})


def test_a_flaky_history_does_not_flip_the_gate_and_shows_its_flake_rate():
    now = started(run(rec("a/x", "fail", False, Failure.of("exception", "boom"))))
    st = standings(now, hist("pass", "fail", "pass"), last=10)
    d = decide(now, history=st)
    assert d.exit_code == 0 and d.regressions == [] and d.load_rate is None  # held out of the rates
    assert "not counted yet" in d.flags[0] and "flake rate 3/4 = 0.75" in d.flags[0]
    assert "a/x: ok after 4 judged runs (pass fail pass fail)" in render(d, now)


def test_a_second_miss_in_a_row_is_a_regression_and_a_clean_run_after_it_is_still_one():
    now = started(run(rec("a/x", "fail", False)))
    assert decide(now, history=standings(now, hist("pass", "fail"), last=10)).exit_code == 1
    clean = started(run(rec("a/x")))
    d = decide(clean, history=standings(clean, hist("fail", "fail"), last=10))
    assert d.exit_code == 1 and "still broken — 1 of 3 clean runs" in d.regressions[0]
    d = decide(clean, history=standings(clean, hist("fail", "fail", "pass", "pass"), last=10))
    assert d.exit_code == 0


def test_the_window_is_the_last_n_runs_before_this_one_counted_once():
    now = run(rec("a/x", "fail", False)).model_copy(update={"started_at": "s3", "run_dir": "/old3"})
    rows = hist("fail", "fail", "pass", "fail", "fail", "fail")  # /old3 is this run; s4, s5 came after it
    st = standings(now, rows, last=3)["a/x"]
    assert st.verdicts == ["fail", "pass", "fail"]  # s1, s2, then this run's verdict once
    assert standings(now, rows, last=2)["a/x"].state == "ok"  # pass, fail: one miss


def test_without_judged_history_a_scenario_is_judged_on_this_run_alone():
    now = started(run(rec("a/x", "fail", False)))
    assert standings(now, {}, last=10) == {} and standings(now, hist("error"), last=10) == {}
    assert decide(now, history=standings(now, hist("error"), last=10)).exit_code == 1


def test_an_infrastructure_error_now_is_still_cannot_judge_under_hysteresis():
    now = started(run(rec("a/x", "error", False, Failure.of("oom", "killed by SIGKILL"))))
    d = decide(now, history=standings(now, hist("pass", "fail"), last=10))
    assert d.exit_code == 2 and d.regressions == [] and "a/x: ok" in d.standings[0]


def test_a_held_miss_is_not_newly_failing_against_the_baseline_either():
    base = run(rec("a/x"))
    now = started(run(rec("a/x", "fail", False)))
    assert decide(now, base).exit_code == 1
    assert decide(now, base, history=standings(now, hist("pass"), last=10)).exit_code == 0


# --- waivers in the gate ----------------------------------------------------------------------------------
def _state(state):
    return WaiverState(waiver=Waiver(id="b/x", release="current", bug="https://x/1"), state=state,
                       why=[] if state == "active" else ["until 2026-01-01 has passed (today is 2026-12-01)"])


def test_stale_waivers_are_flagged_and_fail_the_gate_only_when_asked():
    r = run(rec("a/x"), rec("b/x", "xfail", False, expect=XFAIL))
    d = decide(r, waivers=[_state("expired")])
    assert d.exit_code == 0 and [f for f in d.flags if f.startswith("waiver ")] == \
        ["waiver b/x [expired]: until 2026-01-01 has passed (today is 2026-12-01)"]
    d = decide(r, waivers=[_state("expired")], fail_on_stale_waivers=True)
    assert d.exit_code == 1 and d.regressions == ["waiver b/x [expired]: until 2026-01-01 has passed (today is "
                                                  "2026-12-01)"]
    assert decide(r, waivers=[_state("active")], fail_on_stale_waivers=True).exit_code == 0
    assert "b/x [active]" in render(decide(r, waivers=[_state("active")]), r)
