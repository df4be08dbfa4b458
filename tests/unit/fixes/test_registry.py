"""The fix-module plugin: inert unless asked, unknown names refused at validation, failures
reported instead of raised inside vLLM."""

import json

import pytest

import servematrix_fixes
from servematrix_fixes import ernie45_moe_pp_tied, load, transformers_seqcls_score
from servematrix.config.matrix import load_matrix
from servematrix.config.yamlio import ConfigError

from tests.unit.config.test_matrix import SCENARIO


def test_register_does_nothing_without_servematrix_fixes(monkeypatch, tmp_path):
    report = tmp_path / "fixes.jsonl"
    monkeypatch.delenv("SERVEMATRIX_FIXES", raising=False)
    monkeypatch.setenv("SERVEMATRIX_FIX_REPORT", str(report))
    servematrix_fixes.register()
    assert not report.exists()


def test_an_unknown_fix_is_reported_failed_not_raised(monkeypatch, tmp_path):
    report = tmp_path / "fixes.jsonl"
    monkeypatch.setenv("SERVEMATRIX_FIXES", "no-such-fix")
    monkeypatch.setenv("SERVEMATRIX_FIX_REPORT", str(report))
    servematrix_fixes.register()
    (line,) = [json.loads(x) for x in report.read_text().splitlines()]
    assert line["name"] == "no-such-fix" and line["status"] == "failed" and "unknown fix" in line["detail"]


def test_matrix_with_an_unknown_fix_fails_validation_at_its_line(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    path = write("matrix/m.yaml", "name: m\ninclude:\n  - scenario: alpha\n    fixes: [inject-scal]\n")
    with pytest.raises(ConfigError) as info:
        load_matrix(path)
    assert (info.value.line, info.value.field) == (4, "include.0.fixes")
    assert "unknown fix 'inject-scal'" in info.value.message


def test_enabled_fixes_are_part_of_the_id(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    m = load_matrix(write("matrix/m.yaml", "name: m\ninclude:\n  - {scenario: alpha, fixes: [inject-scale]}\n"))
    assert [e.id for e in m.entries] == ["alpha/tp1-pp1-fp32+inject-scale"]


@pytest.mark.parametrize("name, module", [("ernie45-moe-pp-tied", ernie45_moe_pp_tied),
                                          ("transformers-seqcls-score", transformers_seqcls_score)])
def test_a_fix_for_a_bug_of_this_vllm_is_registered_and_detects_the_bug(name, module):
    """The fixes written for defects vLLM 0.32.0 has (the sweep found both): the registry names each
    module's FIX, and detect() reads the bug in this vLLM."""
    assert load(name) is module.FIX
    state, why = module.FIX.detect()
    assert state == "bug", why
