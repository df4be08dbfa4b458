"""Matrix expansion, include/exclude, expectations, ids and -k selection."""

import textwrap

import pytest

from servematrix.config.expand import select
from servematrix.config.matrix import load_matrix
from servematrix.config.matrix_spec import entry_id
from servematrix.config.yamlio import ConfigError

SCENARIO = """\
name: {name}
tags: [forged]
model:
  path: /nonexistent
quants:
  fp32: {{args: [--dtype, float32]}}
  bf16: {{args: [--dtype, bfloat16]}}
smoke:
  prompts:
    - {{name: p, prompt: "hi"}}
"""


@pytest.fixture
def repo(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    write("scenarios/beta.yaml", SCENARIO.format(name="beta"))
    return write


def ids(m):
    return [e.id for e in m.entries]


def test_axes_expand_to_the_cartesian_product_with_readable_stable_ids(repo):
    path = repo("matrix/m.yaml", textwrap.dedent("""\
        name: m
        scenarios: [alpha, beta]
        axes: {tp: [1, 2], pp: [1], quant: [fp32, bf16]}
    """))
    m = load_matrix(path)
    assert ids(m) == [
        "alpha/tp1-pp1-fp32", "alpha/tp1-pp1-bf16", "alpha/tp2-pp1-fp32", "alpha/tp2-pp1-bf16",
        "beta/tp1-pp1-fp32", "beta/tp1-pp1-bf16", "beta/tp2-pp1-fp32", "beta/tp2-pp1-bf16",
    ]
    assert ids(load_matrix(path)) == ids(m)


def test_quant_axis_defaults_to_each_scenarios_first_quant(repo):
    m = load_matrix(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\n"))
    assert ids(m) == ["alpha/tp1-pp1-fp32"]


def test_exclude_removes_matching_entries_and_include_adds_with_expectation(repo):
    m = load_matrix(repo("matrix/m.yaml", textwrap.dedent("""\
        name: m
        scenarios: [alpha]
        axes: {tp: [1, 2], pp: [1, 2]}
        exclude:
          - {tp: 2, pp: 2}
          - {pp: 2}
        include:
          - scenario: beta
            pp: 2
            quant: bf16
            tags: [pp]
            expect: xfail
            reason: engine dies
            bug: https://github.com/vllm-project/vllm/pull/1
            signature: "AssertionError"
    """)))
    assert ids(m) == ["alpha/tp1-pp1-fp32", "alpha/tp2-pp1-fp32", "beta/tp1-pp2-bf16"]
    beta = m.entries[-1]
    assert beta.expectation.expect == "xfail" and beta.expectation.signature == "AssertionError"
    assert beta.tags == ("forged", "pp")
    assert beta.origin.endswith("m.yaml:8")


def test_expectation_rules_mark_matching_entries_xfail(repo):
    m = load_matrix(repo("matrix/m.yaml", textwrap.dedent("""\
        name: m
        scenarios: [alpha]
        axes: {tp: [1, 2]}
        expectations:
          - match: {tp: 2}
            expect: xfail
            reason: sharding bug
            bug: https://github.com/vllm-project/vllm/pull/38191
    """)))
    assert [e.expectation.expect for e in m.entries] == ["pass", "xfail"]


def test_vllm_and_device_axes_appear_in_the_id_only_when_not_default(repo):
    m = load_matrix(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\naxes: {vllm: [current, cpu-0.20.2]}\n"))
    with pytest.raises(ConfigError, match="unknown vLLM release 'cpu-9.9'"):
        load_matrix(repo("matrix/n.yaml", "name: n\nscenarios: [alpha]\naxes: {vllm: [cpu-9.9]}\n"))
    assert ids(m) == ["alpha/tp1-pp1-fp32", "alpha/tp1-pp1-fp32-cpu-0.20.2"]
    assert entry_id("x", 2, 1, "bf16", "current", "gpu") == "x/tp2-pp1-bf16-gpu"


def test_select_by_substring_glob_and_tag(repo):
    m = load_matrix(repo("matrix/m.yaml", "name: m\nscenarios: [alpha, beta]\naxes: {tp: [1, 2]}\n"))
    assert [e.id for e in select(m.entries, "tp2")] == ["alpha/tp2-pp1-fp32", "beta/tp2-pp1-fp32"]
    assert [e.id for e in select(m.entries, "beta/*")] == ["beta/tp1-pp1-fp32", "beta/tp2-pp1-fp32"]
    assert len(select(m.entries, "tag:forged")) == 4
    assert [e.id for e in select(m.entries, "alpha/tp1*,beta/tp2*")] == ["alpha/tp1-pp1-fp32", "beta/tp2-pp1-fp32"]


def test_the_shipped_default_matrix_validates():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    m = load_matrix(root / "matrix" / "cpu-smoke.yaml")
    assert "tiny-llama/tp1-pp1-fp32" in ids(m) and "tiny-llama/tp2-pp1-fp32" in ids(m)
    pp2 = next(e for e in m.entries if e.pp == 2)
    assert pp2.expectation.expect == "xfail"


def test_duplicate_ids_are_rejected_with_both_origins(repo):
    with pytest.raises(ConfigError, match="duplicate scenario id alpha/tp1-pp1-fp32"):
        load_matrix(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\ninclude:\n  - {scenario: alpha}\n"))


def test_the_default_matrix_serves_the_embedding_model_at_tp1_and_tp2_with_tp1_as_baseline():
    from pathlib import Path

    from servematrix.config import plan

    root = Path(__file__).resolve().parents[3]
    m = load_matrix(root / "matrix" / "cpu-smoke.yaml")
    minilm = [e for e in m.entries if e.scenario == "all-minilm-l6-v2"]
    assert [e.id for e in minilm] == ["all-minilm-l6-v2/tp1-pp1-fp32", "all-minilm-l6-v2/tp2-pp1-fp32"]
    assert all(e.expectation.expect == "pass" for e in minilm)
    scenario = m.scenario("all-minilm-l6-v2")
    assert scenario.smoke.embedding is not None and not plan.gsm8k_runs(True, True, scenario)
    assert plan.baselines(m.scenario, m.entries)["all-minilm-l6-v2/tp2-pp1-fp32"] == "all-minilm-l6-v2/tp1-pp1-fp32"
