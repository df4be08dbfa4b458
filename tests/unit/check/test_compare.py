"""compare: a layout's outcome against its baseline's record. It adds parity, load parity and
agreement, and sets the failure only when the outcome had none; a baseline that failed its own
smoke (or never served) is no reference."""

from __future__ import annotations

import json

import pytest

from servematrix.check import accuracy
from servematrix.config import references
from servematrix.check.compare import AGREEMENT, compare, load_parity
from servematrix.check.verdict import judge
from servematrix.config.matrix import load_matrix
from servematrix.config.scenario import ParitySpec
from servematrix.record import Failure, Gsm8kResult, LoadCheckResult
from servematrix.run.pipeline import now_iso, outcome_for
from tests.unit.run.doubles import REPO, by_id, passed, smoke

BASE = "tiny-llama/tp1-pp1-fp32"
TP2 = "tiny-llama/tp2-pp1-fp32"
PP2 = "tiny-llama/tp1-pp2-fp32"
SMOL_BASE = "smollm2-135m/tp1-pp1-fp32"
SMOL_TP3 = "smollm2-135m/tp3-pp1-fp32"


def no_reference(metric):
    return None


@pytest.fixture(scope="module")
def matrix():
    return load_matrix(REPO / "matrix/cpu-smoke.yaml")


@pytest.fixture(scope="module")
def tiny(matrix):
    return matrix.scenario("tiny-llama")


def entry(matrix, entry_id):
    return by_id(matrix)[entry_id]


def base_record(matrix, tiny, **fields):
    return judge(passed(entry(matrix, BASE), tiny, **fields))


# --- parity ---------------------------------------------------------------------------------------
def test_parity_mismatch_sets_a_smoke_check_failure_on_an_outcome_that_had_none(matrix, tiny):
    rec = passed(entry(matrix, TP2), tiny, ids=[5, 8, 7])
    out = compare(rec, base_record(matrix, tiny), tiny, no_reference)

    assert out.smoke.parity.ok is False and out.smoke.parity.baseline == BASE
    assert len(out.smoke.parity.details) == 3  # every prompt diverged
    assert out.smoke.ok is False
    assert out.failure == Failure.of("check", f"parity with {BASE}: {out.smoke.parity.details[0]}", "smoke")
    assert out.failure.signature.startswith(f"parity with {BASE}: completion: token 1: 8 vs baseline 6")
    assert rec.failure is None and rec.smoke.parity is None  # the input outcome is not changed
    assert judge(out).verdict == "fail"


def test_parity_mismatch_keeps_the_failure_an_outcome_already_had(matrix, tiny):
    earlier = Failure.of("check", "gsm8k.flexible: 0.1000 (n=8) vs ref 0.5000 → fail", "accuracy")
    rec = passed(entry(matrix, TP2), tiny, ids=[5, 8, 7], failure=earlier)
    out = compare(rec, base_record(matrix, tiny), tiny, no_reference)

    assert out.smoke.parity.ok is False  # recorded all the same
    assert out.failure == earlier


def test_matching_greedy_tokens_pass_parity_and_leave_no_failure(matrix, tiny):
    out = compare(passed(entry(matrix, TP2), tiny), base_record(matrix, tiny), tiny, no_reference)

    assert out.smoke.parity.ok and out.smoke.parity.details == []
    assert out.smoke.ok and out.failure is None


def test_a_divergence_on_a_near_tie_is_no_parity_failure(matrix, tiny):
    # position 1: 8 here, 6 at the baseline, and each side has the other's token in its top-k
    base = base_record(matrix, tiny, smoke=smoke(tiny, [5, 6, 7], alternatives={1: 8}))
    rec = passed(entry(matrix, TP2), tiny, smoke=smoke(tiny, [5, 8, 9], alternatives={1: 6}))
    out = compare(rec, base, tiny, no_reference)

    assert out.smoke.parity.ok and out.failure is None


def test_a_shorter_generation_with_an_equal_prefix_is_a_parity_failure(matrix, tiny):
    out = compare(passed(entry(matrix, TP2), tiny, ids=[5, 6]), base_record(matrix, tiny), tiny, no_reference)

    assert not out.smoke.parity.ok
    assert "length 2 vs baseline 3 with equal prefix" in out.failure.signature


def test_a_baseline_that_failed_its_own_smoke_is_no_reference(matrix, tiny):
    base = judge(outcome_for(entry(matrix, BASE), model="tiny-llama", started_at=now_iso(), seconds=1.0,
                             smoke=smoke(tiny, [1, 2, 3], ok=False),
                             failure=Failure.of("check", "empty completion", "smoke")))
    rec = passed(entry(matrix, TP2), tiny, ids=[5, 8, 7])
    out = compare(rec, base, tiny, no_reference)

    assert out is rec  # nothing to add
    assert out.smoke.parity is None and out.failure is None


def test_a_baseline_that_never_served_is_no_reference(matrix, tiny):
    died = Failure.of("exception", "KeyError: 'x'", "load")
    base = judge(outcome_for(entry(matrix, BASE), model="tiny-llama", started_at=now_iso(), seconds=1.0,
                             failure=died))
    rec = passed(entry(matrix, TP2), tiny, ids=[5, 8, 7])

    assert compare(rec, base, tiny, no_reference) is rec


def test_an_outcome_whose_smoke_failed_in_transport_gets_no_parity(matrix, tiny):
    broken = smoke(tiny).model_copy(update={"ok": False, "error": "completion: request failed: closed"})
    died = Failure.of("exception", "RuntimeError: died", "smoke")
    rec = passed(entry(matrix, TP2), tiny, smoke=broken, failure=died)

    out = compare(rec, base_record(matrix, tiny), tiny, no_reference)
    assert out is rec and out.smoke.parity is None and out.failure == died


def test_parity_turned_off_in_the_scenario_compares_nothing(matrix, tiny):
    off = tiny.model_copy(update={"smoke": tiny.smoke.model_copy(update={"parity": ParitySpec(enabled=False)})})
    rec = passed(entry(matrix, TP2), tiny, ids=[5, 8, 7])

    assert compare(rec, base_record(matrix, tiny), off, no_reference) is rec


# --- load parity ------------------------------------------------------------------------------------
def loaded(digests):
    return LoadCheckResult(ok=True, seconds=1.0, digests=digests)


def test_load_parity_at_the_same_tp_fails_on_different_weights_only_when_no_failure_was_set(matrix, tiny):
    base = base_record(matrix, tiny, smoke=None, load_check=loaded({"w": "f32[2]:aa", "v": "f32[2]:bb"}))
    rec = passed(entry(matrix, PP2), tiny, smoke=None, load_check=loaded({"w": "f32[2]:aa", "v": "f32[2]:cc"}))

    out = compare(rec, base, tiny, no_reference)
    assert out.load_check.parity.ok is False and out.load_check.parity.details == ["v: f32[2]:cc != baseline f32[2]:bb"]
    assert out.failure == Failure.of("check", f"load parity with {BASE}: v: f32[2]:cc != baseline f32[2]:bb", "load")

    earlier = Failure.of("exception", "KeyError: 'v'", "load")
    kept = compare(rec.model_copy(update={"failure": earlier}), base, tiny, no_reference)
    assert kept.load_check.parity.ok is False and kept.failure == earlier


def test_load_parity_is_not_asked_of_a_different_tp(matrix, tiny):
    base = base_record(matrix, tiny, smoke=None, load_check=loaded({"w": "f32[4]:aa"}))
    rec = passed(entry(matrix, TP2), tiny, smoke=None, load_check=loaded({"w": "f32[2]:zz"}))

    assert compare(rec, base, tiny, no_reference) is rec  # TP shards differ by design


# --- gsm8k agreement ------------------------------------------------------------------------------
def samples(path, answers):
    path.write_text("".join(json.dumps({"doc_id": i, "filter": "flexible-extract", "filtered_resps": [a]}) + "\n"
                            for i, a in enumerate(answers)))
    return str(path)


def gsm8k_outcome(matrix, entry_id, path, failure=None):
    smol = matrix.scenario("smollm2-135m")
    g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=20, seconds=1.0,
                    samples_path=path)
    checks = [accuracy.judge(c, None, None) for c in smol.accuracy.checks]  # as the pipeline leaves them
    return passed(entry(matrix, entry_id), smol, smoke=None, gsm8k=g, accuracy=checks, failure=failure)


def agreement_reference(metric):
    assert metric == AGREEMENT
    key = references.RefKey(scenario="smollm2-135m", quant="fp32", tp=3)
    return references.Reference(key=key, metric=AGREEMENT, mean=1.0, sigma=0.0, n=20)


def test_agreement_below_its_reference_fails_the_outcome_only_when_it_had_no_failure(matrix, tmp_path):
    smol = matrix.scenario("smollm2-135m")
    base = judge(gsm8k_outcome(matrix, SMOL_BASE, samples(tmp_path / "base.jsonl", ["1"] * 20)))
    rec = gsm8k_outcome(matrix, SMOL_TP3, samples(tmp_path / "tp3.jsonl", ["1"] * 5 + ["2"] * 15))

    out = compare(rec, base, smol, agreement_reference)
    assert out.metrics[AGREEMENT].mean == 0.25 and out.metrics[AGREEMENT].n == 20
    (judged,) = [c for c in out.accuracy if c.metric == AGREEMENT]
    assert judged.status == "fail" and judged.measured == 0.25
    assert [c.metric for c in out.accuracy] == [c.metric for c in smol.accuracy.checks]  # order kept
    assert out.failure.kind == "check" and out.failure.phase == "accuracy"
    assert out.failure.signature.startswith("gsm8k.agreement: 0.2500 (n=20)")

    earlier = Failure.of("check", "gsm8k.nll: worse", "accuracy")
    kept = compare(rec.model_copy(update={"failure": earlier}), base, smol, agreement_reference)
    assert kept.metrics[AGREEMENT].mean == 0.25 and kept.failure == earlier


def test_agreement_without_a_reference_is_reported_and_fails_nothing(matrix, tmp_path):
    smol = matrix.scenario("smollm2-135m")
    base = judge(gsm8k_outcome(matrix, SMOL_BASE, samples(tmp_path / "base.jsonl", ["1"] * 20)))
    rec = gsm8k_outcome(matrix, SMOL_TP3, samples(tmp_path / "tp3.jsonl", ["2"] * 20))

    out = compare(rec, base, smol, no_reference)
    (judged,) = [c for c in out.accuracy if c.metric == AGREEMENT]
    assert judged.status == "no-reference" and out.failure is None
    assert out.metrics[AGREEMENT].mean == 0.0


def test_agreement_needs_both_sides_samples(matrix, tmp_path):
    smol = matrix.scenario("smollm2-135m")
    base = judge(gsm8k_outcome(matrix, SMOL_BASE, None))
    rec = gsm8k_outcome(matrix, SMOL_TP3, samples(tmp_path / "tp3.jsonl", ["2"] * 20))

    assert compare(rec, base, smol, agreement_reference) is rec


def test_when_parity_and_agreement_both_fail_the_failure_is_paritys_and_both_are_recorded(matrix, tmp_path):
    smol = matrix.scenario("smollm2-135m")
    base = judge(gsm8k_outcome(matrix, SMOL_BASE, samples(tmp_path / "base.jsonl", ["1"] * 20))
                 .model_copy(update={"smoke": smoke(smol, [5, 6, 7])}))
    rec = (gsm8k_outcome(matrix, SMOL_TP3, samples(tmp_path / "tp3.jsonl", ["2"] * 20))
           .model_copy(update={"smoke": smoke(smol, [5, 8, 7])}))

    out = compare(rec, base, smol, agreement_reference)
    assert out.smoke.parity.ok is False
    assert [c.status for c in out.accuracy if c.metric == AGREEMENT] == ["fail"]
    assert out.failure.phase == "smoke" and out.failure.signature.startswith(f"parity with {SMOL_BASE}")


def test_load_parity_holds_only_for_the_same_parameters_bit_for_bit():
    base = {"w1": "bf16:[2]:aa", "w2": "bf16:[2]:bb"}
    assert load_parity(dict(base), base, "b").ok
    p = load_parity({"w1": "bf16:[2]:aa", "w3": "bf16:[2]:cc"}, base, "b")
    assert not p.ok and p.baseline == "b"
    assert p.details == ["w2: not loaded (baseline has it)", "w3: loaded here, not in the baseline"]
    changed = load_parity({"w1": "bf16:[2]:aa", "w2": "bf16:[2]:zz"}, base, "b")
    assert changed.details == ["w2: bf16:[2]:zz != baseline bf16:[2]:bb"]


# --- paired tests against the baseline ---------------------------------------------------------------
from servematrix.record import Protocol, QuestionResult  # noqa: E402

PROTOCOL = Protocol(dataset="d", question_ids="0-23", n=24, fewshot_ids=["a"], template="t", max_gen_toks=256,
                    seed=0, servematrix="0.1.0")


def per_question_outcome(matrix, entry_id, nll, answers=None, protocol=PROTOCOL):
    smol = matrix.scenario("smollm2-135m")
    answers = answers or ["1"] * len(nll)
    qs = [QuestionResult(doc_id=i, answer=a, nll=v) for i, (v, a) in enumerate(zip(nll, answers))]
    g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=len(nll), seconds=1.0,
                    questions=qs, protocol=protocol)
    ref = references.Reference(key=references.RefKey(scenario="smollm2-135m", quant="fp32"), metric="gsm8k.nll",
                               mean=sum(BASE_NLL) / len(BASE_NLL), sigma=0.32, n=24)  # the baseline's
    checks = [accuracy.judge(c, accuracy.value_metric(nll) if c.metric == "gsm8k.nll" else None,
                             ref if c.metric == "gsm8k.nll" else None, protocol)
              for c in smol.accuracy.checks]  # as the pipeline leaves them (NLL against its reference)
    return passed(entry(matrix, entry_id), smol, smoke=None, gsm8k=g, accuracy=checks)


BASE_NLL = [1.4 + 0.3 * ((i * 7) % 11 - 5) / 5 for i in range(24)]


def test_a_shift_in_one_layout_only_is_caught_by_the_paired_test_with_its_p_value(matrix):
    smol = matrix.scenario("smollm2-135m")
    base = judge(per_question_outcome(matrix, SMOL_BASE, BASE_NLL))
    rec = per_question_outcome(matrix, SMOL_TP3, [v + 0.1 for v in BASE_NLL])
    before = {c.metric: c for c in rec.accuracy}["gsm8k.nll"]
    assert before.status == "pass" and before.mde > 0.2  # +0.1 is lost in the reference test's spread

    out = compare(rec, base, smol, agreement_reference)
    nll = {c.metric: c for c in out.accuracy}["gsm8k.nll"]
    assert nll.paired.test == "ttest_rel" and nll.paired.baseline == SMOL_BASE and nll.paired.p_value < 1e-6
    assert nll.status == "fail" and out.failure.phase == "accuracy"
    assert out.failure.signature.startswith("gsm8k.nll:") and "paired vs smollm2-135m/tp1-pp1-fp32" in \
        out.failure.signature
    assert judge(out).verdict == "fail"
    agree = {c.metric: c for c in out.accuracy}[AGREEMENT]
    assert agree.status == "pass" and out.metrics[AGREEMENT].mean == 1.0  # from the per-question answers


def test_equal_layouts_pass_the_paired_test(matrix):
    smol = matrix.scenario("smollm2-135m")
    base = judge(per_question_outcome(matrix, SMOL_BASE, BASE_NLL))
    noisy = [v + 1e-7 * ((i % 3) - 1) for i, v in enumerate(BASE_NLL)]  # float noise of a TP reduction
    out = compare(per_question_outcome(matrix, SMOL_TP3, noisy), base, smol, agreement_reference)
    nll = {c.metric: c for c in out.accuracy}["gsm8k.nll"]
    assert nll.paired.status == "pass" and nll.status == "pass" and out.failure is None


def test_layouts_measured_under_different_protocols_are_not_paired(matrix):
    smol = matrix.scenario("smollm2-135m")
    base = judge(per_question_outcome(matrix, SMOL_BASE, BASE_NLL))
    other = PROTOCOL.model_copy(update={"max_gen_toks": 64})
    out = compare(per_question_outcome(matrix, SMOL_TP3, [v + 0.1 for v in BASE_NLL], protocol=other), base,
                  smol, agreement_reference)
    nll = {c.metric: c for c in out.accuracy}["gsm8k.nll"]
    assert nll.paired is None and "paired: not comparable with smollm2-135m/tp1-pp1-fp32: max_gen_toks 256 → 64" \
        in nll.note
