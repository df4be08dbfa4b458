"""The sweep's orchestration, driven with scripted doubles of the release's registry, the mirror and
the load check: every registered architecture becomes cells (none dropped), not-checkable cells
say why, a failing cell makes exit 1, and the run directory is one `gate` reads."""

import json
from pathlib import Path

import pytest

from servematrix.cli import main
from servematrix.record import (Failure, LoadCheckResult, LoadResult, PromptResult, RankResult, RunSummary,
                                SmokeResult)
from servematrix.run.pipeline import Parts
from servematrix.sweep import cells, runner, twins

REPO = Path(__file__).resolve().parents[3]

REGISTRY = {"LlamaForCausalLM": {"kind": "text"}, "Qwen3MoeForCausalLM": {"kind": "text"},
            "MambaForCausalLM": {"kind": "text"}, "Qwen2VLForConditionalGeneration": {"kind": "multimodal"},
            "Param2MoEForCausalLM": {"kind": "text"}}


@pytest.fixture
def doubles(monkeypatch, tmp_path):
    checked = []

    def build(model_type, directory, max_pp, tps):
        assert (max_pp, tps) == (2, [1])  # one twin for every layout of the sweep (tp1, pp2)
        if model_type == "mamba":
            return twins.Twin(model_type=model_type, reason="mirror: no attention heads to plan")
        return twins.Twin(model_type=model_type, path=str(tmp_path / model_type), server_args=["--dtype", "float32"])

    def load_check(cell, opts, python, twin, worlds, parts):
        checked.append(cell.id)
        if cell.id == "qwen3_moe/pp2-none":
            return failed(parts, "KeyError: 'layers.1.mlp.experts.w2_weight'")
        return passed(parts)

    monkeypatch.setattr(runner.registry, "probe", lambda python, env=None: REGISTRY)
    monkeypatch.setattr(runner.twins, "build", build)
    monkeypatch.setattr(runner, "_load_check", load_check)
    return checked


def passed(parts):
    """A load check that passed, into the pipeline's Parts as the real phase fills them."""
    parts.load_check = LoadCheckResult(ok=True, seconds=0.1, ranks=[RankResult(rank=0, ok=True, parameters=3)])
    parts.load = LoadResult(ok=True, seconds=0.1)
    return None


def failed(parts, signature, phase="load"):
    f = Failure.of("exception", signature, phase)
    parts.load = LoadResult(ok=False, error=f)
    return f


def options(tmp_path, **kw):
    kw.setdefault("quants", ["none"])
    return runner.SweepOptions(releases=["current"], layouts=cells.layouts("tp1,pp2"), out=tmp_path / "run", **kw)


def test_every_cell_is_pass_fail_or_not_checkable_with_its_reason(tmp_path, doubles, capsys):
    summary = runner.run(options(tmp_path))
    by_id = {r.id: r for r in summary.scenarios}
    assert len(by_id) == len(REGISTRY) * 2 and summary.status == "complete"
    assert by_id["llama/tp1-none"].verdict == "pass" and by_id["llama/tp1-none"].scenario == "llama"
    fail = by_id["qwen3_moe/pp2-none"]
    assert fail.verdict == "fail" and fail.failure.signature.startswith("KeyError") and (fail.tp, fail.pp) == (1, 2)
    for rid in ("mamba/tp1-none", "Qwen2VLForConditionalGeneration/pp2-none", "Param2MoEForCausalLM/tp1-none"):
        assert by_id[rid].verdict == "skipped" and by_id[rid].note.startswith("not checkable here: ")
    assert "no attention heads" in by_id["mamba/pp2-none"].note
    assert doubles == ["llama/tp1-none", "llama/pp2-none", "qwen3_moe/tp1-none", "qwen3_moe/pp2-none"]
    assert summary.exit_code == 1


def test_the_run_directory_is_runs_and_gate_judges_it(tmp_path, doubles, capsys):
    runner.run(options(tmp_path, k="llama/*"))
    out = tmp_path / "run"
    summary = RunSummary.model_validate_json((out / "summary.json").read_text())
    assert [r.id for r in summary.scenarios] == ["llama/tp1-none", "llama/pp2-none"] and summary.exit_code == 0
    md = (out / "load-success.md").read_text()
    assert "| current | " in md and "| 5 | 3 | 1 | 2 | 2 | 0 |" in md  # registered, forgeable, twins, checked, ...
    assert "| llama | ✓ ᴸ | ✓ ᴸ |" in md  # the heatmap: architectures down, layout × quant across
    assert (tmp_path / "history.sqlite").is_file() and (out / "report.html").is_file()
    assert main(["gate", str(out), "--min-load-rate", "1.0", "--min-accuracy-rate", "0"]) == 0


def test_limit_counts_checkable_cells_and_keeps_every_not_checkable_one(tmp_path, doubles):
    summary = runner.run(options(tmp_path, limit=1))
    assert doubles == ["llama/tp1-none"]
    assert sum(r.verdict == "skipped" for r in summary.scenarios) == 2 * 2  # llava and internlm2, both layouts


def test_a_run_directory_that_holds_a_run_is_refused_before_anything_runs(tmp_path, doubles, capsys):
    runner.run(options(tmp_path, k="llama/tp1*"))
    before = (tmp_path / "run" / "summary.json").read_text()
    assert main(["sweep", "--out", str(tmp_path / "run"), "-k", "llama/*"]) == 2
    assert "already holds a run" in capsys.readouterr().err and doubles == ["llama/tp1-none"]
    assert (tmp_path / "run" / "summary.json").read_text() == before


@pytest.mark.parametrize("argv, words", [(["--layouts", "tp2dp2"], "--layouts"), (["--quant", "int3"], "--quant"),
                                         (["--vllm", "cpu-9.9.9"], "--vllm: not a declared"), (["--limit", "0"], "--limit")])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, argv, words, capsys, doubles):
    assert main(["sweep", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not Path(tmp_path / "x").exists()
    assert doubles == []


def test_the_summary_is_json_with_the_cells_axes(tmp_path, doubles):
    runner.run(options(tmp_path, k="qwen3_moe/*"))
    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {(r["scenario"], r["tp"], r["pp"], r["quant"], r["vllm"]) for r in data["scenarios"]} == {
        ("qwen3_moe", 1, 1, "none", "current"), ("qwen3_moe", 1, 2, "none", "current")}


def test_a_construction_stopped_by_a_gpu_only_library_is_not_checkable_any_other_exception_fails(
        tmp_path, doubles, monkeypatch):
    def load_check(cell, opts, python, twin, worlds, parts):
        sig = "ModuleNotFoundError: No module named 'cutlass'" if cell.tp == 1 and cell.pp == 1 else \
            "ModuleNotFoundError: No module named 'cutlass_helpers'"
        return failed(parts, sig)

    monkeypatch.setattr(runner, "_load_check", load_check)
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="llama/*")).scenarios}
    assert by_id["llama/tp1-none"].verdict == "skipped" and "library this CPU install lacks" in by_id["llama/tp1-none"].note
    assert by_id["llama/pp2-none"].verdict == "fail"


def test_vllms_declared_refusal_of_pp_is_not_supported_a_real_pp_defect_still_fails(tmp_path, doubles, monkeypatch):
    # zamba2's pp2 refusal as the 0.32.0 sweep recorded it; granitemoehybrid's pp2 KeyError is upstream #50961
    refusal = json.loads((REPO / "evidence/sweep-refusals-0.32.0/zamba2-cells.json").read_text())["cells"]
    refusal = next(c["signature"] for c in refusal if c["id"] == "zamba2/pp2-none")

    def load_check(cell, opts, python, twin, worlds, parts):
        if cell.pp == 1:
            return passed(parts)
        return failed(parts, refusal if cell.arch.key == "llama" else "KeyError: 'layers.1.block_sparse_moe.gate.weight'")

    monkeypatch.setattr(runner, "_load_check", load_check)
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="llama/*,qwen3_moe/*")).scenarios}
    assert by_id["llama/pp2-none"].verdict == "skipped"
    assert by_id["llama/pp2-none"].note.startswith("not supported by vLLM: LlamaForCausalLM declares no pipeline")
    assert by_id["qwen3_moe/pp2-none"].verdict == "fail"
    assert by_id["llama/tp1-none"].verdict == by_id["qwen3_moe/tp1-none"].verdict == "pass"


def test_a_composite_parameter_vllm_built_and_never_filled_fails_the_cell_at_tp1_and_is_named(
        tmp_path, doubles, monkeypatch):
    from servematrix.sweep import multimodal

    def build(model_type, directory, max_pp, tps):  # llama's cells stand for a composite's here
        return twins.Twin(model_type=model_type, path=str(tmp_path / model_type), spec={"components": {"vision": {}}})

    asked, described = [], []
    monkeypatch.setattr(runner.twins, "build", build)
    monkeypatch.setattr(multimodal, "unread_params", lambda twin, check_dir: asked.append(check_dir.parent.name)
                        or ["multi_modal_projector.linear_2.bias"])
    monkeypatch.setattr(multimodal, "note", lambda twin, check_dir, tp, unfilled: described.append((tp, unfilled))
                        or f"composite at tp{tp}")
    opts = runner.SweepOptions(releases=["current"], layouts=cells.layouts("tp1,tp2"), quants=["none"],
                               out=tmp_path / "run", k="llama/*")
    by_id = {r.id: r for r in runner.run(opts).scenarios}
    tp1, tp2 = by_id["llama/tp1-none"], by_id["llama/tp2-none"]
    assert tp1.verdict == "fail" and tp1.failure.signature == (
        "servematrix: vLLM built and never filled from the checkpoint: multi_modal_projector.linear_2.bias")
    # found once, at TP=1 where every parameter is whole; the note is told what was found, not asked again
    assert asked == ["tp1-none"]
    assert described == [(1, ["multi_modal_projector.linear_2.bias"]), (2, [])]
    assert tp2.verdict == "pass" and "composite at tp2" in tp2.note


def test_a_k_that_matches_no_cell_is_one_argument_error_and_nothing_is_written(tmp_path, doubles, capsys):
    assert main(["sweep", "--out", str(tmp_path / "run"), "-k", "nosuchmodel/*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -k: no cell matches 'nosuchmodel/*'") and not (tmp_path / "run").exists()


def test_two_releases_have_their_own_cells_coverage_rows_and_worker_key(tmp_path, doubles, monkeypatch):
    monkeypatch.setattr(runner, "_python", lambda release: f"/envs/{release}/bin/python")
    monkeypatch.setattr("servematrix.serve.envs.versions", lambda name, python: {"vllm": name, "torch": "t"})
    summary = runner.run(runner.SweepOptions(releases=["current", "cpu-0.20.2"], layouts=cells.layouts("pp2"),
                                             quants=["none"], k="llama/*", out=tmp_path / "run"))
    assert [(r.id, r.vllm) for r in summary.scenarios] == [("llama/pp2-none", "current"),
                                                           ("llama/pp2-none-cpu-0.20.2", "cpu-0.20.2")]
    md = (tmp_path / "run" / "coverage.md").read_text()
    assert "| current | current | 5 | 3 |" in md and "| cpu-0.20.2 | cpu-0.20.2 | 5 | 3 |" in md


def test_no_cpu_kernel_for_a_quantized_layout_is_not_checkable_a_shard_smaller_than_a_block_fails(
        tmp_path, doubles, monkeypatch):
    def load_check(cell, opts, python, twin, worlds, parts):
        return failed(parts, "ValueError: Failed to find a kernel that can implement the ScaledMM linear "
                             "layer. Reasons:" if cell.layout.name == "pp2" else
                             "ValueError: Weight input_size_per_partition = 64 is not divisible by weight "
                             "quantization block_k = 128.")

    monkeypatch.setattr(runner, "_load_check", load_check)
    monkeypatch.setattr(runner.twins, "quantize", lambda base, q, tps, wide=None: base.model_copy(update={"quant": q}))
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="llama/*", quants=["none", "fp8-block"])).scenarios}
    assert by_id["llama/pp2-fp8-block"].verdict == "skipped"
    assert "the CPU build has no kernel for this twin's fp8-block layout" in by_id["llama/pp2-fp8-block"].note
    assert by_id["llama/pp2-none"].verdict == "fail"  # unquantized: the same refusal is a failure
    assert by_id["llama/tp1-fp8-block"].verdict == "fail"  # vLLM #52997, open upstream: a failure


@pytest.fixture
def served(doubles, monkeypatch):
    """`--depth serve` with the server scripted: llama answers at tp1, dies at pp2 (a forward-time bug)."""
    calls = []

    def serve_double(cell, opts, python, twin, embed_dim=None):
        calls.append(cell.id)
        parts = Parts(model="sweep-twin")
        if cell.pp == 2:
            return parts, failed(parts, "RuntimeError: shape '[1, 4, 64]' is invalid", "serve")
        prompt = PromptResult(name="completion", endpoint="completions", ok=True, text=" 72")
        parts.smoke, parts.load = SmokeResult(ok=True, prompts=[prompt]), LoadResult(ok=True, seconds=20.0)
        return parts, None

    monkeypatch.setattr(runner, "_serve", serve_double)
    return calls


def test_depth_serve_serves_each_cell_whose_load_check_passed_and_labels_the_depth(tmp_path, served):
    summary = runner.run(options(tmp_path, k="llama/*,qwen3_moe/*", depth="serve"))
    by_id = {r.id: r for r in summary.scenarios}
    assert served == ["llama/tp1-none", "llama/pp2-none", "qwen3_moe/tp1-none"]  # qwen3_moe pp2 failed its load check
    ok = by_id["llama/tp1-none"]
    assert ok.verdict == "pass" and ok.smoke.ok and ok.load_check is not None and "depth: serve" in ok.note
    dead = by_id["llama/pp2-none"]
    assert dead.verdict == "fail" and dead.failure.phase == "serve" and dead.failure.signature.startswith("RuntimeError")
    assert by_id["qwen3_moe/pp2-none"].failure.phase == "load" and by_id["qwen3_moe/pp2-none"].smoke is None
    md = (tmp_path / "run" / "load-success.md").read_text()
    assert "| llama | ✓ [1] | ✗ [2] |" in md  # served cells are plain ✓/✗, as run's grid marks a served entry
    assert "| 5 | 3 | 2 | 4 | 2 | 2 | 0 | 2 |" in (tmp_path / "run" / "coverage.md").read_text()  # ... twin-incomplete: 0, served: 2


def test_the_default_depth_never_starts_a_server(tmp_path, served):
    summary = runner.run(options(tmp_path, k="llama/*"))
    assert served == [] and all(r.smoke is None and r.note is None for r in summary.scenarios)


def test_a_cell_the_data_says_cannot_be_served_stops_at_its_load_check_with_the_reason(
        tmp_path, served, monkeypatch):
    rules = runner.serve.rules().model_copy(update={"model_types": {"llama": "no CPU kernel for its attention"}})
    monkeypatch.setattr(runner.serve, "rules", lambda: rules)
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="llama/*", depth="serve")).scenarios}
    assert served == [] and by_id["llama/tp1-none"].verdict == "pass"
    assert by_id["llama/tp1-none"].note == "depth: load (not served: no CPU kernel for its attention)"


def test_an_embedding_cell_is_served_for_vectors_as_wide_as_its_twin_a_classifier_says_why_it_is_not(
        tmp_path, served, monkeypatch):
    from servematrix.record import EmbeddingResult

    monkeypatch.setattr(runner.registry, "probe", lambda python, env=None: {
        "BertModel": {"kind": "embedding"}, "BertForSequenceClassification": {"kind": "classification"}})
    monkeypatch.setattr(runner.twins, "build", lambda key, directory, max_pp, tps: twins.Twin(
        model_type="bert", architecture=key, path=str(tmp_path / key), spec={"config": {"hidden_size": 96}}))
    widths = []

    def serve_double(cell, opts, python, twin, embed_dim=None):
        widths.append((cell.id, embed_dim))
        return Parts(model="sweep-twin", embedding=EmbeddingResult(ok=True), load=LoadResult(ok=True, seconds=9.0)), None

    monkeypatch.setattr(runner, "_serve", serve_double)
    monkeypatch.setattr(runner.pooling, "head_loaded", lambda twin, check_dir: [])  # no twin on disk to compare
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="Bert*/tp1-*", depth="serve")).scenarios}
    assert widths == [("BertModel/tp1-none", 96)]
    embed = by_id["BertModel/tp1-none"]
    assert embed.verdict == "pass" and embed.embedding.ok and "one /v1/embeddings request" in embed.note
    cls = by_id["BertForSequenceClassification/tp1-none"]
    assert cls.verdict == "pass" and "not served: a pooling model of vLLM's classification table" in cls.note


def test_a_wrapper_cell_passes_only_where_vllm_built_the_wrapper_itself(tmp_path, doubles, monkeypatch):
    monkeypatch.setattr(runner.registry, "probe", lambda python, env=None: {
        "TransformersForCausalLM": {"kind": "transformers-backend"},
        "TransformersMoEForCausalLM": {"kind": "transformers-backend"}})

    def load_check(cell, opts, python, twin, worlds, parts):  # the rank record names the class vLLM built
        check = opts.out / cell.id / "loadcheck"
        check.mkdir(parents=True, exist_ok=True)
        built = "Qwen3MoeForCausalLM" if cell.arch.arch == "TransformersMoEForCausalLM" else cell.arch.arch
        (check / "rank0.json").write_text(json.dumps({"rank": 0, "ok": True, "model": built}))
        return passed(parts)

    monkeypatch.setattr(runner, "_load_check", load_check)
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="Transformers*/tp1-*")).scenarios}
    ok = by_id["TransformersForCausalLM/tp1-none"]
    assert ok.verdict == "pass" and "Transformers backend: vLLM built TransformersForCausalLM" in ok.note
    other = by_id["TransformersMoEForCausalLM/tp1-none"]
    assert other.verdict == "skipped" and other.note == ("not checkable here: with --model-impl transformers vLLM "
                                                         "built Qwen3MoeForCausalLM, not TransformersMoEForCausalLM")


def test_a_server_stopped_by_a_gpu_only_library_leaves_the_load_checks_pass(tmp_path, doubles, monkeypatch):
    f = Failure.of("exception", "ModuleNotFoundError: No module named 'flash_attn'", "serve")
    monkeypatch.setattr(runner, "_serve", lambda cell, opts, python, twin, embed_dim=None: (Parts(
        model="m", load=LoadResult(ok=False, error=f)), f))
    (r, _) = runner.run(options(tmp_path, k="llama/*", depth="serve")).scenarios
    assert r.verdict == "pass" and r.failure is None and "depth: load (the server needs a library this CPU install lacks" in r.note


def test_each_cell_is_on_disk_the_moment_it_ends_and_latest_points_at_the_sweep(tmp_path, doubles, monkeypatch):
    """run's lifecycle: the cell's record.json is written before the next cell starts."""
    from servematrix.run import records

    seen = []
    real = runner._load_check

    def load_check(cell, opts, python, twin, worlds, parts):
        seen.append([r.id for r in records.recover(opts.out)])
        return real(cell, opts, python, twin, worlds, parts)

    monkeypatch.setattr(runner, "_load_check", load_check)
    runner.run(options(tmp_path, k="llama/*"))
    assert seen == [[], ["llama/tp1-none"]]
    assert (tmp_path / "latest").resolve() == (tmp_path / "run").resolve()


def test_an_interrupted_sweep_records_the_cell_it_cut_closes_its_workers_and_starts_nothing_more(tmp_path, doubles, monkeypatch):
    closed = []

    class Pool:
        def close_others(self, keep):
            pass

        def close(self):
            closed.append(True)

    def load_check(cell, opts, python, twin, worlds, parts):
        assert cell.arch.model_type == "llama", "a cell started after the interrupt"
        if cell.pp == 2:
            raise KeyboardInterrupt("signal 15")
        return passed(parts)

    monkeypatch.setattr(runner, "_load_check", load_check)
    monkeypatch.setattr(runner, "_worlds", lambda opts: Pool())
    summary = runner.run(options(tmp_path, k="llama/*,qwen3_moe/*"))
    assert summary.status == "interrupted" and summary.exit_code == 2 and closed == [True]
    (done, cut) = summary.scenarios  # the cell the signal cut is recorded as a matrix entry is: interrupted
    assert done.verdict == "pass" and cut.id == "llama/pp2-none" and cut.failure.kind == "interrupted"
    assert cut.verdict == "error" and cut.attempts == 1  # an interrupt is never retried
    on_disk = RunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_text())
    assert on_disk.status == "interrupted" and on_disk.counts == {"pass": 1, "error": 1}


def test_a_cell_that_met_an_infrastructure_failure_is_retried_as_a_matrix_entry_is(tmp_path, doubles, monkeypatch):
    """The pipeline's retry rule (run/pipeline.py with_retries): an OOM-killed check runs again once;
    a check that failed on its own (a KeyError) is not retried."""
    calls = []

    def load_check(cell, opts, python, twin, worlds, parts):
        calls.append(cell.id)
        if cell.id == "llama/tp1-none" and calls.count(cell.id) == 1:
            f = Failure.of("oom", "killed by SIGKILL (OOM killer or operator)")
            parts.load = LoadResult(ok=False, error=f)
            return f
        return failed(parts, "KeyError: 'x'") if cell.pp == 2 else passed(parts)

    monkeypatch.setattr(runner, "_load_check", load_check)
    by_id = {r.id: r for r in runner.run(options(tmp_path, k="llama/*")).scenarios}
    assert calls == ["llama/tp1-none", "llama/tp1-none", "llama/pp2-none"]
    assert by_id["llama/tp1-none"].verdict == "pass" and by_id["llama/tp1-none"].attempts == 2
    assert by_id["llama/pp2-none"].verdict == "fail" and by_id["llama/pp2-none"].attempts == 1
    calls.clear()
    by_id = {r.id: r for r in runner.run(options(tmp_path / "none", k="llama/tp1*", retries=0)).scenarios}
    assert calls == ["llama/tp1-none"] and by_id["llama/tp1-none"].verdict == "error"


def test_the_sweeps_lines_print_a_signature_escaped_masked_and_bounded(tmp_path, doubles, monkeypatch):
    """A failure's signature is a line of vLLM's output: printed through redact.terminal, it can
    neither redraw the terminal nor forge a line, and a secret in it is masked (as `run` prints)."""
    import io

    monkeypatch.setenv("HF_TOKEN", "hf_sweep_secret_value")
    hostile = "KeyError: '\x1b[2J\nFAKE: all pass' hf_sweep_secret_value " + "x" * 5000

    def load_check(cell, opts, python, twin, worlds, parts):
        return failed(parts, hostile)

    monkeypatch.setattr(runner, "_load_check", load_check)
    log = io.StringIO()
    runner.run(options(tmp_path, k="llama/tp1*"), log=log)
    (line,) = [x for x in log.getvalue().splitlines() if x.startswith("[1/")]
    assert "\x1b" not in line and "\\x1b" in line and "\\n" in line and "FAKE" in line
    assert "hf_sweep_secret_value" not in log.getvalue() and len(line) < 400


def test_a_native_cell_of_another_release_is_not_checkable_rather_than_judged_on_the_current_release_s_names(
        tmp_path, doubles):
    from servematrix.sweep import registry

    arch = registry.classify("InternLM2ForCausalLM", "text")
    assert arch.native
    (cell,) = cells.cells([arch], cells.layouts("tp1"), ["none"], ["cpu-0.20.2"])
    out = runner._cell(cell, options(tmp_path), "python", {}, None, {"vllm": "0.20.2", "torch": "2.9"})
    assert out.skipped == ("not checkable here: a native twin's layout is derived from the current release's "
                           "vLLM class only") and doubles == []
