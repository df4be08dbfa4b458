"""References as data, keyed by scenario/layout/device/vLLM range; checks judged against them."""

import textwrap

import pytest

from servematrix.check.accuracy import judge
from servematrix.config.power import needed_n
from servematrix.config.references import Check, References
from servematrix.record import MetricValue
from servematrix.config.matrix import load_matrix
from servematrix.config.yamlio import ConfigError

from tests.unit.config.test_matrix import SCENARIO

REFS = textwrap.dedent("""\
    references:
      - key: {scenario: alpha, quant: fp32, tp: 1, pp: 1, device: cpu, vllm: ">=0.30,<0.33"}
        metric: gsm8k.agreement
        mean: 0.9
        sigma: 0.3
        n: 200
      - key: {scenario: alpha, quant: fp32, tp: 2, pp: 1, device: cpu}
        metric: gsm8k.nll
        mean: 2.0
        sigma: 0.5
        n: 200
""")


def test_references_match_on_key_and_vllm_version_range(write):
    refs = References.load(write("references/r.yaml", REFS).parent)
    assert refs.find("gsm8k.agreement", "alpha", "fp32", 1, 1, "cpu", "0.32.0+cpu").mean == 0.9
    assert refs.find("gsm8k.agreement", "alpha", "fp32", 1, 1, "cpu", "0.29.0") is None
    assert refs.find("gsm8k.agreement", "alpha", "fp32", 2, 1, "cpu", "0.32.0") is None
    assert refs.find("gsm8k.nll", "alpha", "fp32", 2, 1, "cpu", "0.18.1").mean == 2.0


def test_judge_reports_threshold_mde_and_p_value(write):
    refs = References.load(write("references/r.yaml", REFS).parent)
    ref = refs.find("gsm8k.nll", "alpha", "fp32", 2, 1, "cpu", None)
    check = Check(metric="gsm8k.nll", effect=0.2)
    ok = judge(check, MetricValue(mean=2.05, sigma=0.5, stderr=0.035, n=200), ref)
    bad = judge(check, MetricValue(mean=2.5, sigma=0.5, stderr=0.035, n=200), ref)
    assert ok.status == "pass" and bad.status == "fail"
    assert bad.threshold == pytest.approx(2.0 + 1.6448536 * 0.05, abs=1e-4)
    assert bad.p_value < 1e-6 and "MDE" in bad.summary()


def test_no_reference_is_never_a_pass():
    r = judge(Check(metric="gsm8k.flexible", effect=0.05), MetricValue(mean=0.3, sigma=0.46, stderr=0.1, n=20), None)
    assert r.status == "no-reference"


def test_a_limit_too_small_for_the_claimed_effect_is_rejected_with_the_n_it_needs(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha")
          + "accuracy:\n  checks:\n    - {metric: gsm8k.agreement, effect: 0.05}\n")
    write("references/r.yaml", REFS)
    need = needed_n(Check(metric="gsm8k.agreement", effect=0.05),
                    References.load(write("references/r.yaml", REFS).parent).refs[0])
    path = write("matrix/m.yaml", "name: m\nscenarios: [alpha]\ngsm8k:\n  limit: 20\n")
    with pytest.raises(ConfigError) as info:
        load_matrix(path)
    assert info.value.line == 4 and info.value.field == "gsm8k.limit"
    assert f"needs n >= {need}" in info.value.message
    assert load_matrix(write("matrix/ok.yaml", f"name: ok\nscenarios: [alpha]\ngsm8k:\n  limit: {need}\n"))


# --- informative checks only --------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from servematrix.check.accuracy import paired, with_paired  # noqa: E402
from servematrix.config.power import uninformative  # noqa: E402
from servematrix.config.references import RefKey, Reference  # noqa: E402
from servematrix.record import METRIC_DEFS, Protocol, QuestionResult  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
KEY = RefKey(scenario="s", quant="fp32")


def outcomes(metric: str, n: int) -> list[float]:
    """Every result a run of n questions can give: k/n for a proportion; for an unbounded metric
    its floor and values up to far beyond any real change."""
    m = METRIC_DEFS[metric]
    if m.proportion:
        return [k / n for k in range(n + 1)]
    return [m.low, m.low + 1e-9, 0.5, 1.0, 2.0, 10.0, 1e3, 1e6]


def verdicts(check: Check, ref: Reference, n: int) -> set[str]:
    return {judge(check, MetricValue(mean=x, sigma=0.0, stderr=0.0, n=n), ref).status
            for x in outcomes(check.metric, n)}


@pytest.mark.parametrize("metric,mean,n", [("gsm8k.flexible", 0.0, 24), ("gsm8k.flexible", 0.0, 1319),
                                           ("gsm8k.strict", 0.05, 24), ("gsm8k.strict", 0.05, 400),
                                           ("gsm8k.agreement", 1.0, 24), ("gsm8k.agreement", 0.5, 8),
                                           ("gsm8k.nll", 0.0, 24), ("gsm8k.nll", 1.41, 24)])
def test_a_check_is_refused_exactly_when_every_possible_outcome_passes_it(metric, mean, n):
    check = Check(metric=metric, effect=0.15)
    ref = Reference(key=KEY, metric=metric, mean=mean, sigma=0.3, n=n)
    seen = verdicts(check, ref, n)
    assert (uninformative(check, ref, n) is None) == (seen == {"pass", "fail"}), seen


def test_a_reference_at_the_floor_is_refused_saying_why_and_what_would_inform():
    check = Check(metric="gsm8k.flexible", effect=0.15)
    why = uninformative(check, Reference(key=KEY, metric="gsm8k.flexible", mean=0.0, sigma=0.0, n=24), 24)
    assert why.startswith("gsm8k.flexible can never fail: threshold -0.0913 at n=24")
    assert "floor" in why and "gsm8k.nll" in why and "at any n" in why
    # above the floor, more questions help: the message says how many
    low = uninformative(check, Reference(key=KEY, metric="gsm8k.flexible", mean=0.05, sigma=0.2, n=24), 24)
    need = int(low.split("needs n >= ")[1].split()[0])
    ref = Reference(key=KEY, metric="gsm8k.flexible", mean=0.05, sigma=0.2, n=24)
    assert uninformative(check, ref, need) is None and uninformative(check, ref, need - 1) is not None


def test_no_check_in_any_shipped_matrix_can_be_passed_by_every_possible_outcome():
    judged = 0
    for path in sorted((REPO / "matrix").glob("*.yaml")):
        m = load_matrix(path)
        for e, scn, n, i, check, ref in m.judged_checks():
            if ref is None:
                continue  # judged "no reference", which never passes
            judged += 1
            assert verdicts(check, ref, n) == {"pass", "fail"}, (path.name, e.id, check.metric)
    assert judged >= 3  # smollm2's NLL at TP=1/3 and agreement at TP=3 have references


def test_the_smollm2_exact_match_check_is_refused_before_the_data_fix(write):
    original = (REPO / "scenarios/smollm2-135m.yaml").read_text().replace(
        "    - {metric: gsm8k.agreement, effect: 0.15}   # same greedy answer as TP=1 (not judged on TP=1)\n",
        "    - {metric: gsm8k.agreement, effect: 0.15}   # same greedy answer as TP=1 (not judged on TP=1)\n"
        "    - {metric: gsm8k.flexible, effect: 0.15}    # exact match: ~0 for a 135M model on CPU\n")
    path = write("scenarios/smollm2-135m.yaml", original)
    matrix = write("matrix/m.yaml", f"name: m\nreferences_dir: {REPO / 'references'}\nscenarios: []\n"
                                    "include:\n  - {scenario: smollm2-135m, tp: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_matrix(matrix)
    err = info.value
    assert err.path == str(path) and err.field == "accuracy.checks.2"
    assert err.line == original.splitlines().index(
        "    - {metric: gsm8k.flexible, effect: 0.15}    # exact match: ~0 for a 135M model on CPU") + 1
    assert "smollm2-135m/tp1-pp1-fp32: gsm8k.flexible can never fail: threshold -0.0913" in err.message
    assert "\n" not in str(err)


def test_validate_prints_each_checks_smallest_detectable_effect_and_the_paired_n():
    matrix = load_matrix(REPO / "matrix/cpu-smoke.yaml")
    lines = matrix.power_lines()
    nll = [x for x in lines if x.startswith("smollm2-135m/tp1-pp1-fp32 gsm8k.nll")]
    assert len(nll) == 1 and nll[0].startswith("smollm2-135m/tp1-pp1-fp32 gsm8k.nll: n=24: MDE 0.2313 (claims 0.25 "
                                               "at alpha=0.05, beta=0.2) vs reference 1.411")
    # a reference without a protocol fingerprint is said to be one (never silently compared)
    ref = matrix.references.find("gsm8k.nll", "smollm2-135m", "fp32", 1, 1, "cpu", None)
    assert ("no fingerprint in the reference" in nll[0]) == (ref.protocol is None)
    tp3 = [x for x in lines if x.startswith("smollm2-135m/tp3-pp1-fp32 gsm8k.agreement")]
    assert len(tp3) == 1 and "paired with smollm2-135m/tp1-pp1-fp32 over the same 24 questions" in tp3[0]
    assert not [x for x in lines if x.startswith("smollm2-135m/tp1-pp1-fp32 gsm8k.agreement")]


# --- fingerprints ----------------------------------------------------------------------------------
def protocol(**changes) -> Protocol:
    base = dict(dataset="d" * 16, question_ids="0-23", n=24, fewshot_ids=["a", "b"], template="t" * 16,
                max_gen_toks=256, temperature=0.0, stop=["Question:"], seed=0, tokenizer="k" * 16,
                lm_eval="0.4.13", servematrix="0.1.0")
    return Protocol(**{**base, **changes})


def test_a_reference_of_another_protocol_is_not_compared_and_says_what_differs():
    check = Check(metric="gsm8k.nll", effect=0.2)
    ref = Reference(key=KEY, metric="gsm8k.nll", mean=2.0, sigma=0.5, n=24, source="reports/gate-A",
                    protocol=protocol())
    worse = MetricValue(mean=9.0, sigma=0.5, stderr=0.1, n=8)
    r = judge(check, worse, ref, protocol(question_ids="0-7", n=8))
    assert r.status == "not-comparable" and r.threshold is None
    assert r.note == "not comparable with reference reports/gate-A: question_ids 0-23 → 0-7; n 24 → 8"
    assert "not-comparable (not comparable with reference" in r.summary()
    same = judge(check, worse, ref, protocol())
    assert same.status == "fail" and same.note is None


def test_a_side_without_a_fingerprint_is_judged_as_before_and_says_so():
    check = Check(metric="gsm8k.nll", effect=0.2)
    old_ref = Reference(key=KEY, metric="gsm8k.nll", mean=2.0, sigma=0.5, n=200)
    r = judge(check, MetricValue(mean=2.5, sigma=0.5, stderr=0.035, n=200), old_ref, protocol())
    assert r.status == "fail" and r.note == "no fingerprint in the reference: protocols not checked"
    assert "(no fingerprint in the reference: protocols not checked)" in r.summary()
    assert r.needed_n == needed_n(check, old_ref)


# --- paired ----------------------------------------------------------------------------------------
def qs(nll=None, flexible=()):
    nll = nll or [1.0] * 24
    return [QuestionResult(doc_id=i, answer=str(i), flexible=i in flexible, nll=v) for i, v in enumerate(nll)]


def test_paired_nll_fails_a_shift_on_every_question_that_the_reference_test_passes():
    check = Check(metric="gsm8k.nll", effect=0.25)
    base_nll = [1.4 + 0.3 * ((i * 7) % 11 - 5) / 5 for i in range(24)]
    pair = paired(check, qs([v + 0.08 for v in base_nll]), qs(base_nll), "b/tp1")
    assert pair.test == "ttest_rel" and pair.status == "fail" and pair.p_value < 1e-6
    assert pair.shift == pytest.approx(0.08) and pair.tolerance == 0.01 and pair.needed_n == 1
    ref = Reference(key=KEY, metric="gsm8k.nll", mean=sum(base_nll) / 24, sigma=0.32, n=24)
    alone = judge(check, value_metric_of([v + 0.08 for v in base_nll]), ref)
    assert alone.status == "pass"  # 0.08 is under the reference test's MDE of 0.23
    both = with_paired(alone, pair)
    assert both.status == "fail" and both.paired is pair and "paired vs b/tp1 (ttest_rel)" in both.summary()
    assert paired(check, qs(base_nll), qs(base_nll), "b").status == "pass"


def value_metric_of(values):
    from servematrix.check.accuracy import value_metric

    return value_metric(values)


def test_paired_exact_match_is_mcnemar_over_the_discordant_questions():
    check = Check(metric="gsm8k.flexible", effect=0.15)
    base = qs(flexible=set(range(12)))
    layout = qs(flexible=set(range(6)) | {20})  # 6 right answers lost, 1 gained
    pair = paired(check, layout, base, "b")
    assert (pair.test, pair.worse, pair.better, pair.n) == ("mcnemar", 6, 1, 24)
    assert pair.p_value == pytest.approx(8 / 128)  # P(X >= 6 | Bin(7, 1/2))
    assert pair.status == "pass"  # 0.0625 > α
    assert paired(check, qs(flexible=set(range(4))), base, "b").status == "fail"  # 8 lost, none gained: p=1/256
    # a baseline that answered nothing right cannot lose anything: no paired test at all
    assert paired(check, qs(), qs(), "b") is None


# --- reference_from: a reference recorded from a trusted run's metric ---------------------------------
from servematrix.check.accuracy import reference_from  # noqa: E402
from servematrix.config.references import dump_references  # noqa: E402
from servematrix.record import CheckResult, Expected, Gsm8kResult, PairedResult, ScenarioRecord  # noqa: E402

REF_KEY = RefKey(scenario="smollm2-135m", quant="fp32", tp=3, vllm="==0.32.0")
NLL = MetricValue(mean=1.41, sigma=0.32, stderr=0.066, n=24)
ZERO = MetricValue(mean=0.0, sigma=0.0, stderr=0.0, n=24)


def record(metrics: dict[str, MetricValue], checks: list[CheckResult], fingerprint=None) -> ScenarioRecord:
    g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=24, seconds=1.0,
                    protocol=fingerprint or protocol())
    return ScenarioRecord(id="smollm2-135m/tp3-pp1-fp32", scenario="smollm2-135m", model="m", tp=3, pp=1,
                          quant="fp32", vllm="current", device="cpu", expect=Expected(), verdict="pass",
                          started_at="t", seconds=1.0, gsm8k=g, metrics=metrics, accuracy=checks)


def check_result(metric, **fields):
    return CheckResult(metric=metric, status="pass", effect=0.15, alpha=0.05, beta=0.2, measured=0.0, n=24, **fields)


def test_a_recorded_reference_carries_the_records_protocol_and_paired_spread_and_reads_back(write):
    pair = PairedResult(test="ttest_rel", baseline="smollm2-135m/tp1-pp1-fp32", n=24, shift=1e-7, sigma=2e-6,
                        p_value=0.9, mde=0.01, needed_n=1, status="pass")
    rec = record({"gsm8k.nll": NLL}, [check_result("gsm8k.nll", paired=pair)])
    ref = reference_from("gsm8k.nll", NLL, REF_KEY, "reports/gate-A", rec)
    assert ref.protocol == protocol() and ref.paired_sigma == 2e-6
    path = write("references/gsm8k.yaml", dump_references([ref]))
    (back,) = References.load(path.parent).refs
    assert back.protocol == protocol() and back.paired_sigma == 2e-6 and back.mean == NLL.mean


def test_recording_a_reference_that_makes_its_own_check_uninformative_is_refused():
    rec = record({"gsm8k.flexible": ZERO}, [check_result("gsm8k.flexible")])
    with pytest.raises(ConfigError) as info:
        reference_from("gsm8k.flexible", ZERO, REF_KEY, "reports/gate-A", rec)
    msg = str(info.value)
    assert msg.startswith("scenarios/smollm2-135m.yaml: accuracy.checks (gsm8k.flexible): smollm2-135m/tp3-pp1-fp32 "
                          "of run reports/gate-A: gsm8k.flexible can never fail")
    assert "nothing recorded" in msg and "\n" not in msg
    # a metric no check guards is recorded as it is (its number is kept, nothing is gated on it)
    assert reference_from("gsm8k.strict", ZERO, REF_KEY, "reports/gate-A", rec).mean == 0.0
