"""`servematrix bisect` on a sweep cell id: told from a matrix entry id by its form, each probe a
one-cell sweep of the release under search (scripted here), judged by run/bisect.py's rule; a
probe whose cell is not checkable there is skipped like an infrastructure error."""

import pytest

from servematrix.record import Expected, Failure, RunSummary, ScenarioRecord
from servematrix.run import bisect as rb
from servematrix.sweep import bisect as sb

KEYERROR = "KeyError: 'model.layers.0.self_attn.indexer.wk_weights_proj.weight'"


@pytest.mark.parametrize("cell_id, parts", [
    ("glm_moe_dsa/pp2-fp8-block", ("glm_moe_dsa", "pp2", "fp8-block", "current")),
    ("glm_moe_dsa/pp2-fp8-block-cpu-0.20.2", ("glm_moe_dsa", "pp2", "fp8-block", "cpu-0.20.2")),
    ("llama/tp2pp2-none", ("llama", "tp2pp2", "none", "current")),
    ("LlavaForConditionalGeneration/tp1-fp8-kv-cpu-0.18.1",
     ("LlavaForConditionalGeneration", "tp1", "fp8-kv", "cpu-0.18.1")),
    ("qwen3/tp2-awq-cpu-0.20.2", ("qwen3", "tp2", "awq", "cpu-0.20.2"))])
def test_a_sweep_cell_id_parses_into_its_axes(cell_id, parts):
    c = sb.parse(cell_id)
    assert (c.key, c.layout.name, c.quant, c.release) == parts and c.id == cell_id


@pytest.mark.parametrize("other", ["tiny-llama/tp2-pp1-bf16", "tiny-glm-5.1-dsa/tp1-pp2-bf16-cpu-0.20.2",
                                   "llama/tp2-int3", "llama/-none", "llama", "seed-bugs"])
def test_a_matrix_entry_id_or_an_unknown_quant_is_not_a_cell(other):
    assert sb.parse(other) is None


def test_the_bisect_command_sends_a_cell_id_to_one_cell_sweeps(tmp_path, monkeypatch, capsys):
    from servematrix.cli import main

    seen = []

    def fake(cell, low, high, out, signature, overwrite=False):
        seen.append((cell.id, low, high))
        return rb.BisectResult(scenario=cell.id, releases=[low, high], probes=[])

    monkeypatch.setattr(sb, "bisect_cell", fake)
    code = main(["bisect", "glm_moe_dsa/pp2-fp8-block", "--between", "0.20.2", "0.32.0",
                 "--out", str(tmp_path / "b")])
    assert seen == [("glm_moe_dsa/pp2-fp8-block", "0.20.2", "0.32.0")]
    assert code == 1 and "no change of outcome" in capsys.readouterr().out  # no probes: nothing judged


def record(rid, release, verdict, sig=None, note=None):
    return ScenarioRecord(id=rid, scenario="glm_moe_dsa", model="M", tp=1, pp=2, quant="fp8-block", vllm=release,
                          device="cpu", expect=Expected(), started_at="t", seconds=1.0, verdict=verdict, note=note,
                          failure=Failure.of("exception", sig) if sig else None)


def test_bisect_cell_finds_the_first_good_release_with_one_cell_sweeps(tmp_path, monkeypatch):
    monkeypatch.setattr(rb, "candidates", lambda lo, hi: ["cpu-0.20.2", "cpu-0.21.0", "cpu-0.22.1", "cpu-0.23.0",
                                                          "cpu-0.32.0"])
    monkeypatch.setattr(sb.envs, "probe", lambda python: {"vllm": "0.32.0"})
    asked = []

    def sweep(opts):
        (rel,) = opts.releases
        asked.append((rel, opts.k, [lay.name for lay in opts.layouts], opts.quants))
        rid = "glm_moe_dsa/pp2-fp8-block" + ("" if rel == "current" else f"-{rel}")
        bad = rel in ("cpu-0.20.2", "cpu-0.21.0", "cpu-0.22.1")
        rows = [record(rid, rel, "fail" if bad else "pass", KEYERROR if bad else None)]
        return RunSummary(matrix="sweep", run_dir=str(opts.out), host="h", vllm_version=rel, torch_version="t",
                          servematrix_version="0", started_at="t", scenarios=rows)

    cell = sb.parse("glm_moe_dsa/pp2-fp8-block-cpu-0.20.2")
    result = sb.bisect_cell(cell, "0.20.2", "0.32.0", tmp_path / "b", "KeyError", sweep=sweep)
    assert result.change == "fix" and [p.release for p in result.pair] == ["cpu-0.22.1", "cpu-0.23.0"]
    assert result.pair[0].signature == KEYERROR and result.scenario == "glm_moe_dsa/pp2-fp8-block"
    assert asked[0] == ("cpu-0.20.2", "[g]lm_moe_dsa/pp2-fp8-block-cpu-0.20.2", ["pp2"], ["fp8-block"])
    assert ("current", "[g]lm_moe_dsa/pp2-fp8-block", ["pp2"], ["fp8-block"]) in asked  # 0.32.0 is this vLLM


def test_a_cell_not_checkable_on_a_release_is_skipped_not_bad(tmp_path, monkeypatch):
    monkeypatch.setattr(rb, "candidates", lambda lo, hi: ["cpu-0.18.1", "cpu-0.20.2", "cpu-0.32.0"])
    monkeypatch.setattr(sb.envs, "probe", lambda python: {"vllm": "0.32.0"})

    def sweep(opts):
        (rel,) = opts.releases
        rid = "minimax_m2/tp2-none" + ("" if rel == "current" else f"-{rel}")
        row = {"cpu-0.18.1": record(rid, rel, "skipped", note="not checkable here: not registered"),
               "cpu-0.20.2": record(rid, rel, "fail", "ValueError: heads")}.get(rel, record(rid, rel, "pass"))
        return RunSummary(matrix="sweep", run_dir=str(opts.out), host="h", vllm_version=rel, torch_version="t",
                          servematrix_version="0", started_at="t", scenarios=[row])

    result = sb.bisect_cell(sb.parse("minimax_m2/tp2-none"), "0.18.1", "0.32.0", tmp_path / "b", None, sweep=sweep)
    outcomes = {p.release: p.outcome for p in result.probes}
    assert outcomes["cpu-0.18.1"] == "other" and result.change == "fix"
    assert [p.release for p in result.pair] == ["cpu-0.20.2", "cpu-0.32.0"]
