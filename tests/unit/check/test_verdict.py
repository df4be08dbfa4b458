"""Verdicts against expectations, and the run's exit code."""

import pytest

from servematrix.record import Failure
from servematrix.config.matrix import Expectation
from servematrix.check.verdict import decide, exit_code

XFAIL = dict(expect="xfail", reason="k_norm sharding", bug="https://github.com/vllm-project/vllm/pull/38191")
SHAPE = Failure.of("exception", "RuntimeError: The size of tensor a (64) must match the size of tensor b (32)")


def test_expected_pass_that_passes_is_pass():
    assert decide(Expectation(), None) == ("pass", None)


def test_expected_pass_that_fails_is_fail():
    assert decide(Expectation(), SHAPE)[0] == "fail"


def test_xfail_that_fails_is_xfail_with_reason_and_bug():
    verdict, note = decide(Expectation(**XFAIL), SHAPE)
    assert verdict == "xfail" and "k_norm sharding" in note and "38191" in note


def test_xfail_with_a_different_failure_signature_is_a_real_fail():
    verdict, note = decide(Expectation(**XFAIL, signature=r"KeyError: .*k_scale"), SHAPE)
    assert verdict == "fail" and "expected a failure matching" in note


def test_strict_xfail_that_passes_is_xpass_asking_to_drop_the_waiver():
    verdict, note = decide(Expectation(**XFAIL), None)
    assert verdict == "xpass" and "drop the waiver" in note
    assert decide(Expectation(**XFAIL, strict=False), None)[0] == "pass"


@pytest.mark.parametrize("kind", ["timeout", "port-in-use", "oom", "interrupted", "model", "tool"])
def test_infrastructure_failures_are_errors_never_regressions(kind):
    f = Failure.of(kind, "x")
    assert f.infra
    assert decide(Expectation(), f)[0] == "error"
    assert decide(Expectation(**XFAIL), f)[0] == "error"


@pytest.mark.parametrize("verdicts, code", [
    (["pass", "xfail"], 0),
    (["pass", "fail"], 1),
    (["pass", "xpass"], 1),
    (["pass", "error"], 2),
    (["error", "fail"], 1),
    ([], 0),
])
def test_exit_code(verdicts, code):
    assert exit_code(verdicts) == code


def _outcome(**kw):
    from servematrix.record import EntryOutcome, Expected

    return EntryOutcome(id="llama/tp1-none", scenario="llama", model="LlamaForCausalLM", tp=1, pp=1, quant="none",
                        vllm="current", device="cpu", expect=Expected(), started_at="t", seconds=1.0, **kw)


def test_a_twin_that_lacks_what_vllm_read_is_twin_incomplete_pass_or_fail_and_says_what_the_check_alone_said():
    from servematrix.check.verdict import judge

    failed = judge(_outcome(incomplete="model.norm.bias", failure=Failure.of("exception", "KeyError: 'model.norm.bias'")))
    assert failed.verdict == "twin-incomplete"
    assert failed.note == ("twin-incomplete: the twin lacks model.norm.bias; the load check alone said fail: "
                           "KeyError: 'model.norm.bias'")
    assert judge(_outcome(incomplete="x")).note == "twin-incomplete: the twin lacks x; the load check alone said pass"
    # an infrastructure failure says nothing about the twin either: it stays an error
    infra = Failure(kind="timeout", signature="timed out", infra=True, phase="load")
    assert judge(_outcome(incomplete="x", failure=infra)).verdict == "error"


def test_the_remarks_follow_the_verdict_s_note_and_are_not_written_as_fields_of_the_record():
    from servematrix.check.verdict import judge

    rec = judge(_outcome(remarks=["depth: load", "twin from X"]))
    assert (rec.verdict, rec.note) == ("pass", "depth: load; twin from X")
    rec = judge(_outcome(skipped="not checkable here: y", remarks=["twin from X"]))
    assert (rec.verdict, rec.note) == ("skipped", "not checkable here: y; twin from X")
    assert {"remarks", "incomplete", "skipped"}.isdisjoint(rec.model_dump())
