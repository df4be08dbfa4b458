"""An MTP draft as a sweep cell on real vLLM (the CPU build): DeepSeekMTPModel at TP=1 and TP=2, its twin
the deepseek_v3 twin plus the draft layer under DeepSeek-V3's published names, load-checked as vLLM's
spec-decode proposer loads it (`--speculative-config`, the draft built on the last PP rank). The cells
must pass, vLLM must have resolved the draft the cell names, and the draft's own tensors must sit in
its parameters bit for bit; the same twin less its draft layer fails with vLLM's own refusal, so the
check can fail."""

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import servematrix, sweep, twin_of

pytestmark = pytest.mark.integration
ARCH = "DeepSeekMTPModel"
# the draft's own tensors at DeepSeek-V3's names (the twin has 4 decoder layers: the draft is layer 4)
OWN = {f"model.layers.4.{n}" for n in ("eh_proj.weight", "embed_tokens.weight", "enorm.weight", "hnorm.weight",
                                       "shared_head.head.weight", "shared_head.norm.weight")}
# replicated in vLLM's draft (nn.Linear, RMSNorm): whole on every TP rank
REPLICATED = {f"model.layers.4.{n}" for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight")}


@pytest.fixture(scope="module")
def drafted(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("drafts") / "run"
    proc, by_id = sweep(out, "tp1,tp2", f"{ARCH}/*", shared_cache)
    return proc, out, by_id


def _ranks(out: Path, cell: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / cell / "loadcheck").glob("rank*.json"))]


def test_the_draft_cells_pass_with_the_draft_vllm_resolved_from_the_target_s_config(drafted):
    proc, out, by_id = drafted
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert {i: r["verdict"] for i, r in by_id.items()} == {f"{ARCH}/tp1-none": "pass", f"{ARCH}/tp2-none": "pass"}
    for cell, tp in ((f"{ARCH}/tp1-none", 1), (f"{ARCH}/tp2-none", 2)):
        ranks = _ranks(out, cell)
        assert len(ranks) == tp and all(r["ok"] and r["model"] == "DeepseekV3ForCausalLM" for r in ranks)
        assert all(r["draft_architecture"] == ARCH and r["draft_model"] == "DeepSeekMTP" for r in ranks), ranks
        assert "--speculative-config" in by_id[cell]["server_command"] and "--loadcheck-draft" in by_id[cell]["server_command"]
    assert by_id[f"{ARCH}/tp1-none"]["note"].startswith(f"draft: vLLM resolved {ARCH}, built DeepSeekMTP")


def test_the_draft_s_parameters_hold_the_twin_s_draft_tensors_bit_for_bit(drafted):
    from servematrix.sweep import drafts

    _, out, by_id = drafted
    tp1 = by_id[f"{ARCH}/tp1-none"]
    twin = twin_of(tp1)
    assert twin.name.startswith(f"{ARCH}-") and (twin / drafts.DRAFT_FILE).is_file()
    found = {t.name: t for t in drafts.draft_loaded(twin, out / f"{ARCH}/tp1-none" / "loadcheck")}
    assert OWN <= set(found) and all(found[n].loaded for n in OWN), {n: found.get(n) for n in OWN}
    # the decoder layer's unfused tensors too (vLLM renames them into mtp_block.)
    assert found["model.layers.4.input_layernorm.weight"].param == "model.layers.4.mtp_block.input_layernorm.weight"
    assert "its own tensors: 6 of 6 loaded bit for bit" in tp1["note"]
    # TP=2: the replicated tensors are whole on both ranks
    for rank in _ranks(out, f"{ARCH}/tp2-none"):
        held = set(rank["draft_digests"].values())
        hits = {t.name for t in drafts.draft_loaded(twin, out / f"{ARCH}/tp2-none" / "loadcheck")
                if t.loaded and rank["draft_digests"].get(t.param) in held}
        assert REPLICATED <= hits, (rank["rank"], hits)


def test_the_same_twin_without_its_draft_layer_fails_with_vllm_s_own_refusal(drafted, tmp_path):
    from servematrix.serve import loadcheck
    from servematrix.serve.server import LaunchSpec
    from servematrix.sweep import drafts

    _, out, by_id = drafted
    record = by_id[f"{ARCH}/tp1-none"]
    bare = tmp_path / "no-draft"
    shutil.copytree(twin_of(record), bare)
    (bare / drafts.DRAFT_FILE).unlink()
    (bare / drafts.INDEX).unlink()
    argv = shlex.split(record["server_command"])
    argv = argv[argv.index("--model"):]  # the server's arguments, after the worker's own flags
    argv[1] = str(bare)
    spec = LaunchSpec(argv=[sys.executable, "-m", loadcheck.SERVER_MODULE, *argv],
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"}, port=0, log_path=tmp_path / "check.log", startup_timeout=150)
    check = loadcheck.Check(attention={"mla": "TRITON_MLA"}, out=tmp_path / "check", draft=True)
    from servematrix.record import StageFailed

    with pytest.raises(StageFailed) as failed:
        loadcheck.run(spec, check)
    assert "MTP speculative decoding layer 4 weights missing from checkpoint" in failed.value.failure.signature
