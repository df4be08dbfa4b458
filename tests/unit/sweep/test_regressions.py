"""Across releases: the same cell on two releases (ids less the release suffix) compared by
report/comparison.py's rule, newly failing and newly passing listed per release pair, in the run's
markdown and regressions.json; a sweep over one release has no regression list."""

import json

from servematrix.record import Expected, Failure, RunSummary, ScenarioRecord
from servematrix.sweep import regressions, runner
from servematrix.sweep.report import Coverage, write_reports


def rec(cell, release, verdict, sig=None):
    rid = cell if release == "current" else f"{cell}-{release}"
    return ScenarioRecord(id=rid, scenario=cell.split("/")[0], model="M", tp=1, pp=2, quant="fp8-block", vllm=release,
                          device="cpu", expect=Expected(), started_at="t", seconds=1.0, verdict=verdict,
                          failure=Failure.of("exception", sig) if sig else None)


KEYERROR = "KeyError: 'model.layers.0.self_attn.indexer.wk_weights_proj.weight'"
ROWS = [rec("glm_moe_dsa/pp2-fp8-block", "cpu-0.20.2", "fail", KEYERROR), rec("llama/pp2-none", "cpu-0.20.2", "pass"),
        rec("mamba/pp2-none", "cpu-0.20.2", "skipped"), rec("qwen3/tp2-none", "cpu-0.20.2", "pass"),
        rec("glm_moe_dsa/pp2-fp8-block", "current", "pass"), rec("llama/pp2-none", "current", "fail", "ValueError: x"),
        rec("mamba/pp2-none", "current", "fail", "E"), rec("olmo3/tp1-none", "current", "pass")]


def summary(tmp_path, rows=ROWS):
    return RunSummary(matrix="sweep", run_dir=str(tmp_path), host="h", vllm_version="0.20.2", torch_version="t",
                      servematrix_version="0", started_at="t", scenarios=rows, status="complete", exit_code=1)


def test_cell_key_strips_only_the_release_suffix():
    assert regressions.cell_key(ROWS[0]) == "glm_moe_dsa/pp2-fp8-block"
    assert regressions.cell_key(ROWS[4]) == "glm_moe_dsa/pp2-fp8-block"


def test_newly_failing_and_passing_follow_the_comparison_rule_skips_are_neither(tmp_path):
    (p,) = regressions.pairs(summary(tmp_path), ["cpu-0.20.2", "current"], {"current": "0.32.0"})
    assert p.newly_passing == [f"glm_moe_dsa/pp2-fp8-block: fail → pass (was {KEYERROR})"]
    assert p.newly_failing == ["llama/pp2-none: pass → fail (ValueError: x)"]  # mamba: skipped → fail is neither
    assert p.compared == 3 and p.only_before == ["qwen3/tp2-none"] and p.only_after == ["olmo3/tp1-none"]
    md = regressions.regressions_md([p])
    assert "### cpu-0.20.2 → current (0.32.0): 3 cells on both, 1 newly failing, 1 newly passing" in md
    assert "- newly failing: llama/pp2-none: pass → fail (ValueError: x)" in md


def test_a_cell_skipped_on_either_release_is_on_both_but_not_judged(tmp_path):
    """As every fp8-block cell of the CUDA wheel on a CPU host (no CPU FP8 kernel): present on both
    releases, no verdict on one, so the list says how many it really compared."""
    (p,) = regressions.pairs(summary(tmp_path), ["cpu-0.20.2", "current"])
    assert p.compared == 3 and p.judged == 2  # mamba/pp2-none: skipped on 0.20.2
    assert "- 2 of the 3 with a verdict on both (the rest skipped or not checkable" in regressions.regressions_md([p])


def test_a_cell_only_one_release_has_is_told_apart_not_run_there_from_not_selected_there(tmp_path):
    """An interrupted two-release sweep: current was asked for llama and mamba and recorded only
    llama; 0.20.2 ran qwen3/tp2 too, which current was never asked for."""
    rows = [rec("llama/pp2-none", "cpu-0.20.2", "pass"), rec("qwen3/tp2-none", "cpu-0.20.2", "pass"),
            rec("mamba/pp2-none", "cpu-0.20.2", "pass"), rec("llama/pp2-none", "current", "pass")]
    s = summary(tmp_path, rows).model_copy(update={"status": "interrupted", "selected": [
        "llama/pp2-none-cpu-0.20.2", "qwen3/tp2-none-cpu-0.20.2", "mamba/pp2-none-cpu-0.20.2",
        "llama/pp2-none", "mamba/pp2-none"]})
    (p,) = regressions.pairs(s, ["cpu-0.20.2", "current"])
    assert sorted(p.only_before) == ["mamba/pp2-none", "qwen3/tp2-none"]
    assert p.not_run_after == ["mamba/pp2-none"] and p.not_run_before == []
    md = regressions.regressions_md([p])
    assert ("- only on cpu-0.20.2: 2 cells: 1 selected on current too and not run there (the sweep stopped before "
            "them), 1 not selected on current (not in its registry, or past --limit)") in md


def test_three_releases_give_consecutive_pairs_in_the_order_given(tmp_path):
    got = regressions.pairs(summary(tmp_path), ["cpu-0.18.1", "cpu-0.20.2", "current"])
    assert [(p.before, p.after) for p in got] == [("cpu-0.18.1", "cpu-0.20.2"), ("cpu-0.20.2", "current")]
    assert got[0].compared == 0 and len(got[0].only_after) == 4


def test_the_reports_hold_the_list_with_two_releases_and_not_with_one(tmp_path):
    covs = [Coverage(release="cpu-0.20.2", vllm="0.20.2", registered=3, forgeable=3),
            Coverage(release="current", vllm="0.32.0", registered=4, forgeable=4)]
    write_reports(summary(tmp_path), covs)
    md = (tmp_path / "load-success.md").read_text()
    assert "newly passing: glm_moe_dsa/pp2-fp8-block: fail → pass (was KeyError" in md
    assert "the regression list" in (tmp_path / "coverage.md").read_text()
    (p,) = json.loads((tmp_path / "regressions.json").read_text())
    assert p["newly_failing"] == ["llama/pp2-none: pass → fail (ValueError: x)"] and p["after_vllm"] == "0.32.0"
    one = tmp_path / "one"
    one.mkdir()
    write_reports(summary(one, ROWS[4:]), covs[1:])
    assert not (one / "regressions.json").exists() and "regression list" not in (one / "coverage.md").read_text()


def test_a_two_release_quantized_sweep_end_to_end_with_doubles(tmp_path, monkeypatch, capsys):
    """The runner builds one quantized twin per (model_type, quant) from the base twin and lists
    the cell that changed between the releases."""
    from servematrix.record import LoadCheckResult, LoadResult, RankResult
    from servematrix.sweep import twins

    quantized = []
    monkeypatch.setattr(runner.registry, "probe", lambda python, env=None: {"GlmMoeDsaForCausalLM": {"kind": "text"}})
    monkeypatch.setattr(runner, "_python", lambda release: f"/envs/{release}/bin/python")
    monkeypatch.setattr("servematrix.serve.envs.versions", lambda name, python: {"vllm": name, "torch": "t"})
    monkeypatch.setattr(runner.twins, "build", lambda mt, d, pp, tps: twins.Twin(model_type=mt, path="/base"))
    monkeypatch.setattr(runner.twins, "quantize", lambda base, q, tps, wide=None: quantized.append((base.path, q, tps)) or
                        twins.Twin(model_type=base.model_type, quant=q, path="/q", note="the DSA indexer's wk in FP8"))

    def load_check(cell, opts, python, twin, worlds, parts):
        assert twin.path == "/q"
        if cell.release == "cpu-0.20.2":
            f = Failure.of("exception", KEYERROR)
            parts.load = LoadResult(ok=False, error=f)
            return f
        parts.load_check = LoadCheckResult(ok=True, seconds=0.1, ranks=[RankResult(rank=0, ok=True, parameters=3)])
        parts.load = LoadResult(ok=True, seconds=0.1)
        return None

    monkeypatch.setattr(runner, "_load_check", load_check)
    from servematrix.cli import main

    assert main(["sweep", "--vllm", "cpu-0.20.2", "--vllm", "current", "--layouts", "tp1,pp2", "--quant", "fp8-block",
                 "-k", "glm_moe_dsa/pp2*", "--out", str(tmp_path / "run")]) == 1  # a failing cell
    assert "cpu-0.20.2 -> current: 1 cells on both\n  newly passing: glm_moe_dsa/pp2-fp8-block: fail → pass" \
        in capsys.readouterr().out
    s = RunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_text())
    assert [(r.id, r.verdict) for r in s.scenarios] == [("glm_moe_dsa/pp2-fp8-block-cpu-0.20.2", "fail"),
                                                        ("glm_moe_dsa/pp2-fp8-block", "pass")]
    assert s.scenarios[1].note == "the DSA indexer's wk in FP8"
    assert quantized == [("/base", "fp8-block", [1])]  # one quantized twin, shared by both releases
    (p,) = json.loads((tmp_path / "run" / "regressions.json").read_text())
    assert p["newly_passing"] == [f"glm_moe_dsa/pp2-fp8-block: fail → pass (was {KEYERROR})"]


def test_narrow_twin_reasons_are_counted_together_in_coverage():
    from servematrix.sweep.report import _reason

    a = _reason("not checkable here: fp8-block: the CPU FP8 block kernel takes K blocks of 128 only, and the twin's "
                "linears are narrower at TP=2 (o_proj [128, 128]): a twin this small cannot hold the layout")
    b = _reason("not checkable here: fp8-block: the CPU FP8 block kernel takes K blocks of 128 only, and the twin's "
                "linears are narrower at TP=2 (down_proj [256, 128]): a twin this small cannot hold the layout")
    assert a == b == "fp8-block: the twin's linears are narrower than the CPU FP8 block kernel's K block (128) at this TP"
