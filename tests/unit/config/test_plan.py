"""config.plan: which setting wins (command line, then matrix, then scenario), what --backend
means, and which selected entry each layout is compared with."""

from __future__ import annotations

import pytest

from servematrix.config import plan
from servematrix.config.matrix_spec import Entry, Expectation, entry_id
from servematrix.config.scenario import ParitySpec, QuantSpec
from servematrix.run.options import RunOptions
from servematrix.serve.docker import DockerConfig
from tests.unit.run.doubles import by_id, matrix_file

XFAIL = "expect: xfail, reason: reproduces the bug, bug: 'https://example.com/issues/2'"


# --- first ----------------------------------------------------------------------------------------
def test_first_is_the_most_specific_setting_given():
    assert plan.first(5, 30, 600) == 5
    assert plan.first(None, 30, 600) == 30
    assert plan.first(None, None, 600) == 600
    assert plan.first(None, None, None) is None
    assert plan.first() is None


def test_first_counts_zero_and_false_as_given_not_as_missing():
    assert plan.first(0, 30) == 0
    assert plan.first(None, False, True) is False


# --- startup timeout and gsm8k limit --------------------------------------------------------------
@pytest.fixture
def timed(tmp_path):
    return matrix_file(tmp_path, "startup_timeout: 30\ngsm8k: {limit: 6}\nscenarios: [tiny-llama]\n", "timed")


@pytest.fixture
def plain(tmp_path):
    return matrix_file(tmp_path, "scenarios: [tiny-llama]\n", "plain")


def test_the_command_lines_startup_timeout_beats_the_matrixs_which_beats_the_scenarios(timed, plain):
    scenario = timed.scenario("tiny-llama")
    assert scenario.server.startup_timeout == 600
    assert timed.spec.startup_timeout == 30 and plain.spec.startup_timeout is None
    assert plan.startup_timeout(5, timed.spec.startup_timeout, scenario) == 5
    assert plan.startup_timeout(None, timed.spec.startup_timeout, scenario) == 30
    assert plan.startup_timeout(None, plain.spec.startup_timeout, scenario) == 600
    assert plan.startup_timeout(5, plain.spec.startup_timeout, scenario) == 5


def test_the_command_lines_gsm8k_limit_beats_the_matrixs_which_beats_the_scenarios(timed, plain):
    scenario = timed.scenario("tiny-llama")
    assert scenario.gsm8k.limit == 8
    assert plan.gsm8k_limit(3, 6, 8) == 3
    assert plan.gsm8k_limit(None, 6, 8) == 6
    assert plan.gsm8k_limit(None, None, 8) == 8
    assert plan.gsm8k_limit(None, None, None) is None  # the whole test set
    # the limit a run uses (Matrix.gsm8k_limit, which the pipeline asks) follows the same rule
    assert timed.gsm8k_limit(scenario, 3) == 3
    assert timed.gsm8k_limit(scenario) == 6
    assert plain.gsm8k_limit(scenario) == 8


def test_gsm8k_runs_only_when_command_line_matrix_and_scenario_all_leave_it_on(tmp_path, plain):
    scenario = plain.scenario("tiny-llama")
    off = matrix_file(tmp_path, "gsm8k: {enabled: false}\nscenarios: [tiny-llama]\n", "gsm8k-off")
    no_gsm8k = scenario.model_copy(update={"gsm8k": scenario.gsm8k.model_copy(update={"enabled": False})})
    assert plain.spec.gsm8k.enabled and not off.spec.gsm8k.enabled
    assert plan.gsm8k_runs(True, plain.spec.gsm8k.enabled, scenario) is True
    assert plan.gsm8k_runs(False, plain.spec.gsm8k.enabled, scenario) is False
    assert plan.gsm8k_runs(True, off.spec.gsm8k.enabled, scenario) is False
    assert plan.gsm8k_runs(True, plain.spec.gsm8k.enabled, no_gsm8k) is False


# --- --backend ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, pair", [("local", ("local", "local")), ("docker", ("local", "docker")),
                                           ("ray", ("ray", "local"))])
def test_a_backend_names_the_dispatcher_and_the_server_kind(backend, pair, tmp_path):
    assert plan.dispatch(backend) == pair
    options = RunOptions.of(tmp_path, backend=backend)
    assert (options.dispatcher, options.entry.server_kind) == pair
    assert isinstance(options.entry.docker, DockerConfig) == (backend == "docker")  # settings only for docker


def test_an_unknown_backend_is_refused():
    with pytest.raises(KeyError):
        plan.dispatch("kubernetes")


# --- baselines ------------------------------------------------------------------------------------
FIXED = f"""
include:
  - {{scenario: tiny-llama, tp: 2, fixes: [cpu-moe-silu, inject-scale]}}
  - {{scenario: tiny-llama, tp: 1}}
  - {{scenario: tiny-llama, tp: 1, fixes: [cpu-moe-silu]}}
  - {{scenario: tiny-llama, tp: 1, fixes: [inject-scale]}}
  - {{scenario: tiny-llama, tp: 1, fixes: [cpu-moe-silu, inject-scale], {XFAIL}}}
  - {{scenario: tiny-llama, tp: 1, device: gpu, fixes: [cpu-moe-silu, inject-scale]}}
  - {{scenario: tiny-llama-2kv, tp: 2}}
"""
LAYOUT = "tiny-llama/tp2-pp1-fp32+cpu-moe-silu+inject-scale"
PLAIN = "tiny-llama/tp1-pp1-fp32"
SILU = "tiny-llama/tp1-pp1-fp32+cpu-moe-silu"
SCALE = "tiny-llama/tp1-pp1-fp32+inject-scale"
BOTH_XFAIL = "tiny-llama/tp1-pp1-fp32+cpu-moe-silu+inject-scale"
BOTH_GPU = "tiny-llama/tp1-pp1-fp32-gpu+cpu-moe-silu+inject-scale"
KV_TP2 = "tiny-llama-2kv/tp2-pp1-fp32"


@pytest.fixture
def fixed(tmp_path):
    return matrix_file(tmp_path, FIXED, "fixed")


def baseline_among(matrix, entry, ids):
    e = by_id(matrix)
    return plan.baseline_id(e[entry], matrix.scenario(e[entry].scenario), [e[i] for i in ids])


def test_a_baseline_is_its_own_baseline(fixed):
    assert baseline_among(fixed, PLAIN, [PLAIN]) == PLAIN
    assert baseline_among(fixed, BOTH_XFAIL, [PLAIN, BOTH_XFAIL]) == BOTH_XFAIL


def test_the_baseline_expected_to_pass_is_preferred_over_an_xfail_one_sharing_more_fixes(fixed):
    assert baseline_among(fixed, LAYOUT, [LAYOUT, BOTH_XFAIL, SILU]) == SILU


def test_the_baseline_sharing_the_most_fix_modules_wins(fixed):
    assert baseline_among(fixed, LAYOUT, [LAYOUT, PLAIN, SILU]) == SILU


def test_the_first_listed_wins_between_baselines_sharing_as_many_fixes(fixed):
    assert baseline_among(fixed, LAYOUT, [LAYOUT, SCALE, SILU, PLAIN]) == SCALE
    assert baseline_among(fixed, LAYOUT, [LAYOUT, SILU, SCALE, PLAIN]) == SILU


def test_an_xfail_baseline_is_taken_only_when_no_passing_one_was_selected(fixed):
    assert baseline_among(fixed, LAYOUT, [LAYOUT, BOTH_XFAIL]) == BOTH_XFAIL


def test_no_baseline_when_none_of_the_layouts_scenario_device_and_vllm_was_selected(fixed):
    assert baseline_among(fixed, LAYOUT, [LAYOUT]) is None
    assert baseline_among(fixed, LAYOUT, [LAYOUT, BOTH_GPU]) is None  # another device is no reference
    assert baseline_among(fixed, KV_TP2, [KV_TP2, PLAIN, SILU]) is None  # another scenario is no reference


def test_baselines_maps_every_selected_entry(fixed):
    ids = [LAYOUT, PLAIN, SILU, KV_TP2]
    e = by_id(fixed)
    assert plan.baselines(fixed.scenario, [e[i] for i in ids]) == {LAYOUT: SILU, PLAIN: PLAIN, SILU: SILU, KV_TP2: None}


# --- is_baseline --------------------------------------------------------------------------------------
def make_entry(tp=1, pp=1, quant="fp32", scenario="tiny-llama") -> Entry:
    return Entry(id=entry_id(scenario, tp, pp, quant, "current", "cpu"), scenario=scenario, tp=tp, pp=pp,
                 quant=quant, vllm="current", device="cpu", tags=(), expectation=Expectation(), origin="test:1")


def test_is_baseline_is_tp1_pp1_at_the_scenarios_first_quant_by_default(plain):
    tiny = plain.scenario("tiny-llama")
    two_quants = tiny.model_copy(update={"quants": {**tiny.quants, "bf16": QuantSpec(args=["--dtype", "bfloat16"])}})
    assert plan.is_baseline(make_entry(), two_quants)
    assert not plan.is_baseline(make_entry(tp=2), two_quants)
    assert not plan.is_baseline(make_entry(pp=2), two_quants)
    assert not plan.is_baseline(make_entry(quant="bf16"), two_quants)


def test_a_scenario_may_name_another_layout_and_quant_as_its_baseline(plain):
    tiny = plain.scenario("tiny-llama")
    scenario = tiny.model_copy(update={
        "quants": {**tiny.quants, "bf16": QuantSpec(args=["--dtype", "bfloat16"])},
        "smoke": tiny.smoke.model_copy(update={"parity": ParitySpec(baseline_tp=2, baseline_quant="bf16")}),
    })
    base, one = make_entry(tp=2, quant="bf16"), make_entry(tp=1, quant="bf16")
    assert plan.is_baseline(base, scenario) and not plan.is_baseline(make_entry(tp=2), scenario)
    assert plan.baseline_id(one, scenario, [one, make_entry(), base]) == base.id
