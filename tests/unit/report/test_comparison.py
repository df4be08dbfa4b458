"""One run against another (gate --baseline, diff): results measured under different gsm8k
protocols are never compared — refused with what differs (exit 2) — and records written before
fingerprints say "no fingerprint" and are compared as before."""

from __future__ import annotations

import pytest

from servematrix.cli import main
from servematrix.errors import StateError
from servematrix.record import (CheckResult, Expected, Gsm8kResult, LoadResult, MetricValue, Protocol, RunSummary,
                                ScenarioRecord)
from servematrix.report.comparison import compare_runs

ID = "smollm2-135m/tp1-pp1-fp32"


def protocol(**changes) -> Protocol:
    base = dict(dataset="d" * 16, question_ids="0-23", n=24, fewshot_ids=["a", "b"], template="t" * 16,
                max_gen_toks=256, temperature=0.0, stop=["Question:"], seed=0, tokenizer="k" * 16,
                lm_eval="0.4.13", servematrix="0.1.0")
    return Protocol(**{**base, **changes})


def rec(nll: float, proto: Protocol | None, verdict: str = "pass") -> ScenarioRecord:
    g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=24, seconds=1.0,
                    protocol=proto)
    check = CheckResult(metric="gsm8k.nll", status=verdict, measured=nll, n=24, reference=1.41, mde=0.23,
                        threshold=1.56, p_value=0.5, effect=0.25, alpha=0.05, beta=0.2)
    return ScenarioRecord(id=ID, scenario="smollm2-135m", model="m", tp=1, pp=1, quant="fp32", vllm="current",
                          device="cpu", expect=Expected(), verdict=verdict, load=LoadResult(ok=True), started_at="t",
                          seconds=1.0, gsm8k=g, metrics={"gsm8k.nll": MetricValue(mean=nll, sigma=0.3, stderr=0.06,
                                                                                    n=24)},
                          accuracy=[check])


def run(run_dir, *records) -> RunSummary:
    return RunSummary(matrix="m", run_dir=str(run_dir), host="h", vllm_version="0.32.0", torch_version="t",
                      servematrix_version="0.1.0", started_at="t", status="complete", scenarios=list(records),
                      selected=[r.id for r in records])


def test_a_different_protocol_is_refused_naming_what_differs():
    a = run("/runs/a", rec(1.41, protocol()))
    b = run("/runs/b", rec(1.95, protocol(question_ids="0-7", n=8), "fail"))
    with pytest.raises(StateError) as info:
        compare_runs(a, b)
    assert str(info.value) == ("/runs/b/summary.json: not comparable with /runs/a (gsm8k measured differently): "
                               f"{ID}: question_ids 0-23 → 0-7; n 24 → 8")


def test_without_refusing_the_scenario_is_listed_not_comparable_and_nothing_of_it_is_compared():
    a = run("/runs/a", rec(1.41, protocol()))
    b = run("/runs/b", rec(1.95, protocol(max_gen_toks=64), "fail"))
    changes = compare_runs(a, b, refuse=False)
    assert changes.not_comparable == [f"{ID}: max_gen_toks 256 → 64"]
    assert changes.newly_failing == [] and changes.accuracy_moves == []
    assert changes.sections()["not comparable"] == changes.not_comparable


def test_the_same_protocol_is_compared_and_a_move_beyond_the_mde_shown():
    changes = compare_runs(run("/runs/a", rec(1.41, protocol())), run("/runs/b", rec(1.95, protocol(), "fail")))
    assert changes.not_comparable == [] and changes.no_fingerprint == []
    assert changes.newly_failing
    assert changes.accuracy_moves == [f"{ID}: gsm8k.nll 1.4100 → 1.9500 (beyond MDE 0.2300)"]


def test_a_record_without_a_fingerprint_is_compared_as_before_and_says_so():
    changes = compare_runs(run("/runs/a", rec(1.41, None)), run("/runs/b", rec(1.95, protocol(), "fail")))
    assert changes.no_fingerprint == [f"{ID}: no fingerprint in A (written before fingerprints); compared as before"]
    assert changes.accuracy_moves and changes.newly_failing


def _two_protocols(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, r in (("a", rec(1.41, protocol())), ("b", rec(1.41, protocol(question_ids="0-7", n=8)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(run(tmp_path / name, r).model_dump_json())


def test_gate_refuses_a_protocol_change_with_exit_2_and_one_line(tmp_path, monkeypatch, capsys):
    _two_protocols(tmp_path, monkeypatch)
    assert main(["gate", "b", "--baseline", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not comparable with" in err and "n 24 → 8" in err, err


def test_diff_lists_a_protocol_change_as_not_comparable_and_compares_nothing_of_it(tmp_path, monkeypatch, capsys):
    _two_protocols(tmp_path, monkeypatch)
    assert main(["diff", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "not comparable: 1" in out and "n 24 → 8" in out, out
    assert "newly failing: 0" in out and "accuracy moves: 0" in out
