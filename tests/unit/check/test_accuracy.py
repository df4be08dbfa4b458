"""References as data, keyed by scenario/layout/device/vLLM range; checks judged against them."""

import textwrap

import pytest

from servematrix.check.accuracy import judge, needed_n
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
