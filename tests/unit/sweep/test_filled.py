"""sweep/filled.py: at TP=1 every parameter vLLM built must hold a tensor of the twin, a stack vLLM
builds from several, or a transform vLLM applies by design. The twins here are tiny safetensors files
and the "load check" a rank0.json of digests computed as the worker computes them; the stacks and
slices are built the way vLLM's loaders build them (QKVParallelLinear, FusedMoE, mamba_mixer2's
narrowing loader)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from servematrix.serve.loadcheck_worker import _digest
from servematrix.sweep import filled


def _twin(path, tensors):
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _check(path, params):
    path.mkdir(parents=True)
    (path / "rank0.json").write_text(json.dumps({"rank": 0, "ok": True,
                                                 "digests": {n: _digest(p) for n, p in params.items()}}))
    return path


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(3)
    t = {f"model.layers.0.self_attn.{p}.weight": torch.randn(8, 16, generator=g).bfloat16()
         for p in ("q_proj", "k_proj", "v_proj")}
    for e in range(2):
        for p in ("gate_proj", "up_proj"):
            t[f"model.layers.0.mlp.experts.{e}.{p}.weight"] = torch.randn(4, 16, generator=g).bfloat16()
        t[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = torch.randn(16, 4, generator=g).bfloat16()
    t["model.layers.0.mixer.in_proj.weight"] = torch.randn(12, 16, generator=g).bfloat16()
    t["model.layers.0.mixer.A_log"] = torch.randn(4, generator=g).bfloat16()
    return t


def test_stacks_vllm_builds_from_the_twin_count_as_filled_and_other_bytes_do_not(tmp_path, tensors):
    twin = _twin(tmp_path / "twin", tensors)
    a = "model.layers.0.self_attn."
    e = "model.layers.0.mlp.experts."
    params = {
        a + "qkv_proj.weight": torch.cat([tensors[a + f"{p}_proj.weight"] for p in "qkv"]),
        e + "w13_weight": torch.stack([torch.cat([tensors[e + f"{i}.gate_proj.weight"], tensors[e + f"{i}.up_proj.weight"]])
                                       for i in range(2)]),
        e + "w2_weight": torch.stack([tensors[e + f"{i}.down_proj.weight"] for i in range(2)]),
        # held in another dtype than the checkpoint's, as vLLM may keep it: the same values
        "model.layers.0.mixer.in_proj.weight": tensors["model.layers.0.mixer.in_proj.weight"].float(),
        "model.norm.weight": torch.randn(16).bfloat16(),  # built, never filled
    }
    assert filled.unfilled(["llama"], twin, _check(tmp_path / "check", params)) == ["model.norm.weight"]


def test_a_slice_of_a_twin_tensor_is_not_filled(tmp_path, tensors):
    # mamba2 before its fix: vLLM built a narrower mixer and its loader narrowed the twin's tensor to it
    twin = _twin(tmp_path / "twin", tensors)
    params = {"model.layers.0.mixer.in_proj.weight": tensors["model.layers.0.mixer.in_proj.weight"][:9]}
    assert filled.unfilled(["mamba2"], twin, _check(tmp_path / "check", params)) == ["model.layers.0.mixer.in_proj.weight"]


def test_a_transform_vllm_applies_by_design_is_known_only_for_its_families(tmp_path, tensors):
    twin = _twin(tmp_path / "twin", tensors)
    a_param = -torch.exp(tensors["model.layers.0.mixer.A_log"].float())  # mamba_mixer2's A, every family
    conv = torch.randn(16, 16).bfloat16()  # GPT-2's Conv1D, transposed on load: gpt2's cells only
    check = _check(tmp_path / "check", {"model.layers.0.mixer.A": a_param, "transformer.h.0.attn.c_attn.weight": conv})
    assert filled.unfilled(["gpt2"], twin, check) == []
    assert filled.unfilled(["llama"], twin, check) == ["transformer.h.0.attn.c_attn.weight"]


def test_every_transform_and_every_unused_parameter_says_where_vllm_does_it():
    r = filled.rules()
    for t in (*r.transforms, *r.unused):
        assert ".py" in t.why, t.pattern


def test_a_parameter_vllm_leaves_unread_by_design_is_not_unfilled_in_its_family_only(tmp_path):
    # vLLM's DFlash drafter builds mask_embedding as zeros and reads it only from a mask_embedding.pt override
    twin = _twin(tmp_path / "twin", {"model.norm.weight": torch.randn(8)})
    check = _check(tmp_path / "check", {"model.mask_embedding": torch.zeros(8)})
    assert filled.unfilled(["DFlashDraftModel", "qwen3"], twin, check) == []
    assert filled.unfilled(["qwen3"], twin, check) == ["model.mask_embedding"]


def test_fused_experts_count_as_filled_where_vllm_holds_each_expert_transposed(tmp_path):
    # transformers 5 saves a layer's experts as one [experts, in, out] tensor (gpt_oss, Llama 4); vLLM's w13/w2
    # hold each expert as [out, in]
    g = torch.Generator().manual_seed(5)
    gate_up, down = torch.randn(2, 16, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    twin = _twin(tmp_path / "twin", {"model.layers.0.mlp.experts.gate_up_proj": gate_up,
                                     "model.layers.0.mlp.experts.down_proj": down})
    check = _check(tmp_path / "check", {"model.layers.0.mlp.experts.routed_experts.w13_weight": gate_up.transpose(1, 2),
                                        "model.layers.0.mlp.experts.routed_experts.w2_weight": down.transpose(1, 2),
                                        "model.layers.0.mlp.experts.routed_experts.w13_bias": torch.randn(2, 8)})
    assert filled.unfilled(["gpt_oss"], twin, check) == ["model.layers.0.mlp.experts.routed_experts.w13_bias"]


def test_an_fp8_scale_still_holding_vllms_sentinel_after_loading_was_never_loaded(tmp_path):
    # vLLM pre-fills FP8 scales with float32's min (fp8_utils.FP8_SCALE_SENTINEL); a loaded one is positive
    sentinel = torch.full((2, 1), torch.finfo(torch.float32).min)
    digests = {"model.layers.0.mlp.fc2.weight_scale_inv": _digest(sentinel),
               "model.layers.0.mlp.fc1.weight_scale_inv": _digest(torch.tensor([[0.5], [0.25]])),
               "model.layers.0.mlp.fc2.bias": _digest(sentinel)}  # not a scale: whatever it holds
    for rank, names in enumerate((list(digests)[:2], list(digests)[2:])):  # over every rank
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"digests": {n: digests[n] for n in names}}))
    assert filled.unloaded_scales(tmp_path) == ["model.layers.0.mlp.fc2.weight_scale_inv"]


def test_a_kv_cache_scale_still_holding_vllms_minus_one_after_loading_was_never_loaded(tmp_path):
    # vLLM creates k_scale / v_scale holding -1.0 (kv_cache.py KVCacheScaleParameter), in the model's dtype
    digests = {"model.layers.1.self_attn.attn.k_scale": _digest(torch.tensor(-1.0, dtype=torch.bfloat16)),
               "model.layers.1.self_attn.attn.v_scale": _digest(torch.tensor(1.0, dtype=torch.bfloat16)),
               "model.layers.1.self_attn.attn.q_scale": _digest(torch.tensor(-1.0, dtype=torch.bfloat16)),
               "model.layers.1.self_attn.o_proj.weight_scale": _digest(torch.tensor(-1.0))}
    (tmp_path / "rank0.json").write_text(json.dumps({"digests": digests}))
    # q_scale: no checkpoint carries it (nor does the twin); a weight scale is the other rule's
    assert filled.unloaded_kv_scales(tmp_path) == ["model.layers.1.self_attn.attn.k_scale"]
