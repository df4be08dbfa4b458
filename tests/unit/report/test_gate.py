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
