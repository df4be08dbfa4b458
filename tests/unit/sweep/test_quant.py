"""Quantized cells: the twin's ForgeSpec re-forged with the forge's own FP8 options as data/sweep-quants.yaml
says, the first block that divides every quantized linear and its TP shards, the DSA families'
indexer-wk layout, and a reason (never a silent drop) where a twin cannot take the layout."""

import pytest

from servematrix.config.forge_spec import ForgeSpec
from servematrix.sweep import quant, twins

CONFIG = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 2048, "tie_word_embeddings": False}
SPEC = ForgeSpec(model_type="llama", architecture="LlamaForCausalLM", config=CONFIG).model_dump(mode="json")
SHAPES = {f"model.layers.{i}.{m}.weight": s for i in range(2) for m, s in [
    ("self_attn.q_proj", (128, 128)), ("self_attn.k_proj", (64, 128)), ("self_attn.v_proj", (64, 128)),
    ("self_attn.o_proj", (128, 128)), ("mlp.gate_proj", (256, 128)), ("mlp.up_proj", (256, 128)),
    ("mlp.down_proj", (128, 256))]} | {"model.embed_tokens.weight": (512, 128), "lm_head.weight": (512, 128)}


WIDE = {n: (s[0] * 2, s[1] * 2) for n, s in SHAPES.items()}
WIDE_SPEC = {**SPEC, "config": {**CONFIG, "hidden_size": 256, "intermediate_size": 512, "head_dim": 128}}


@pytest.mark.parametrize("spec, shapes, tp, block_n", [(SPEC, SHAPES, 1, 64), (WIDE_SPEC, WIDE, 1, 128),
                                                       (WIDE_SPEC, WIDE, 2, 128)])  # 1 KV head: replicated
def test_block_n_is_the_first_that_divides_every_output_shard_and_block_k_is_the_cpu_kernels_128(
        spec, shapes, tp, block_n):
    q = quant.quantized("llama", spec, shapes, "fp8-block", [tp])
    assert q.reason is None and f"{block_n}x128 blocks" in q.note
    (entry,) = q.spec["quantize"]
    assert entry["method"] == "fp8-block" and entry["block"] == [block_n, 128]
    assert ForgeSpec.model_validate(q.spec).quantize[0].config()["weight_block_size"] == [block_n, 128]


def test_a_row_parallel_shard_narrower_than_a_k_block_is_a_reason_naming_the_linears():
    q = quant.quantized("llama", SPEC, SHAPES, "fp8-block", [2])  # o_proj's 128 inputs: 64 a rank
    assert q.spec is None and "K blocks of 128 only" in q.reason and "TP=2" in q.reason
    assert "o_proj [128, 128]" in q.reason and "down_proj [128, 256]" not in q.reason  # 256 / 2 is one block


def test_the_dsa_families_take_the_indexer_wk_layout_and_no_quantization_config():
    for mt in ("glm_moe_dsa", "deepseek_v32"):
        dsa = {**SPEC, "model_type": mt, "architecture": "X"}
        q = quant.quantized(mt, dsa, SHAPES, "fp8-block", [1, 2])
        assert q.spec["quantize"] == [] and "indexer's wk" in q.note
        assert q.spec["fp8_blocks"] == [{"tensors": "model.layers.*.self_attn.indexer.wk.weight", "block": [128, 128]}]


def test_fp8_kv_adds_kv_cache_scales_where_attention_has_a_k_proj_and_says_why_not_otherwise():
    q = quant.quantized("llama", SPEC, SHAPES, "fp8-kv", [1])
    assert [e["method"] for e in q.spec["quantize"]] == ["fp8-block", "kv_cache_scales"]
    fused = {k.replace("k_proj", "qkv_proj"): v for k, v in SHAPES.items() if "v_proj" not in k}
    q = quant.quantized("llama", SPEC, fused, "fp8-kv", [1])
    assert q.spec is None and "no model.layers.0.self_attn.k_proj.weight" in q.reason


def test_every_quant_name_is_a_rule_and_none_comes_first():
    assert quant.names() == ("none", "fp8-block", "fp8-kv", "awq", "gptq")


def test_a_quantized_twin_is_forged_from_the_base_spec_and_serves_in_bfloat16(monkeypatch, tmp_path):
    forged = []
    monkeypatch.setattr("servematrix.checkpoint.forge.forge",
                        lambda name, spec: forged.append((name, spec)) or tmp_path / name)
    base = twins.Twin(model_type="llama", path=str(tmp_path / "base"), spec=SPEC, shapes=SHAPES,
                      server_args=["--enforce-eager", "--dtype", "float32"])
    t = twins.quantize(base, "fp8-block", [1])
    assert t.ok and t.quant == "fp8-block" and t.server_args == ["--enforce-eager", "--dtype", "bfloat16"]
    ((name, spec),) = forged
    assert name == "sweep-llama-fp8-block" and spec.quantize[0].block == [64, 128] and spec.config == SPEC["config"]


def test_a_twin_without_a_layout_or_without_a_base_says_why(monkeypatch):
    base = twins.Twin(model_type="llama", path="/x", spec=SPEC, shapes=SHAPES)
    assert "K blocks of 128 only" in twins.quantize(base, "fp8-block", [2]).reason
    gone = twins.Twin(model_type="mamba", reason="mirror: no attention heads")
    t = twins.quantize(gone, "fp8-block", [1])
    assert not t.ok and t.reason == "mirror: no attention heads"


def test_a_forge_failure_is_the_twins_reason(monkeypatch):
    def boom(name, spec):
        raise RuntimeError("transformers refused")
    monkeypatch.setattr("servematrix.checkpoint.forge.forge", boom)
    t = twins.quantize(twins.Twin(model_type="llama", path="/x", spec=SPEC, shapes=SHAPES), "fp8-block", [1])
    assert not t.ok and t.reason.startswith("forge (fp8-block): RuntimeError: transformers refused")


@pytest.mark.parametrize("method", ["awq", "gptq"])
@pytest.mark.parametrize("tps, group", [([1], 128), ([2], 64), ([1, 2], 64)])
def test_awq_and_gptq_take_the_first_group_that_every_tp_shard_holds_whole_in_float16(method, tps, group):
    q = quant.quantized("llama", SPEC, SHAPES, method, tps)  # o_proj's 128 inputs: 64 a rank at TP=2
    (entry,) = q.spec["quantize"]
    assert entry["method"] == method and entry["group_size"] == group and q.spec["dtype"] == "float16"
    assert f"4-bit, group {group}" in q.note
    config = ForgeSpec.model_validate(q.spec).quantize[0].config()
    assert config["quant_method"] == method and config["group_size"] == group


def test_a_shard_no_group_divides_is_a_reason_naming_the_linear():
    narrow = {**SHAPES, "model.layers.0.mlp.down_proj.weight": (128, 48)}  # 24 inputs a rank at TP=2
    q = quant.quantized("llama", SPEC, narrow, "awq", [2])
    assert q.spec is None and "no group size of [128, 64, 32]" in q.reason and "down_proj [128, 24] at TP=2" in q.reason


def test_an_awq_twin_is_forged_and_served_in_float16(monkeypatch, tmp_path):
    monkeypatch.setattr("servematrix.checkpoint.forge.forge", lambda name, spec: tmp_path / name)
    base = twins.Twin(model_type="llama", path=str(tmp_path / "base"), spec=SPEC, shapes=SHAPES,
                      server_args=["--enforce-eager", "--dtype", "float32"], load_only="MLA")
    t = twins.quantize(base, "awq", [2])
    assert t.ok and t.server_args == ["--enforce-eager", "--dtype", "float16"] and t.load_only == "MLA"


def test_vllms_cpu_refusal_of_a_layout_is_data_per_quant():
    refusal = "ValueError: Failed to find a kernel that can implement the ScaledMM linear layer. Reasons: ..."
    assert quant.refused_on_cpu("fp8-block", refusal) and quant.refused_on_cpu("fp8-kv", refusal)
    assert not quant.refused_on_cpu("fp8-block", "ValueError: Weight input_size_per_partition = 64 is not divisible")
    assert not quant.refused_on_cpu("none", refusal)


# Names from the published layouts: Mixtral-8x7B's experts and router, DeepSeek-V3's MLA projections
# and router. AutoAWQ (awq/models/mixtral.py, deepseek_v3.py) and AutoGPTQ (modeling/mixtral.py)
# quantize each expert's w1/w3/w2 and kv_a_proj_with_mqa beside q_a_proj, as DeepSeek-V3's FP8
# checkpoint does (kv_a_proj_with_mqa.weight F8_E4M3 with its weight_scale_inv); routers and norms stay.
QUANTIZED_IN_REAL_4BIT = ["model.layers.0.block_sparse_moe.experts.3.w1.weight",
                          "model.layers.1.block_sparse_moe.experts.0.w2.weight",
                          "model.layers.1.block_sparse_moe.experts.7.w3.weight",
                          "model.layers.0.self_attn.q_a_proj.weight",
                          "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                          "model.layers.3.mlp.experts.12.down_proj.weight"]
KEPT_IN_REAL_4BIT = ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.3.mlp.gate.weight",
                     "model.layers.0.self_attn.kv_a_layernorm.weight", "model.embed_tokens.weight",
                     "lm_head.weight"]


@pytest.mark.parametrize("method, fields", [("awq", {"group_size": 128}), ("gptq", {"group_size": 128}),
                                            ("fp8-block", {"block": [128, 128]}), ("fp8-kv", {"block": [128, 128]})])
def test_quantized_twins_quantize_the_experts_and_mla_projections_real_checkpoints_quantize(method, fields):
    rule = quant.rules()[method]
    selects = quant._method(rule, **fields).selects
    assert [n for n in QUANTIZED_IN_REAL_4BIT if not selects(n)] == []
    assert [n for n in KEPT_IN_REAL_4BIT if selects(n)] == []


def test_kv_projections_split_when_there_are_as_many_kv_heads_as_ranks_so_the_block_fits_the_shard():
    """mixtral's twin (2 KV heads of 64, k_proj [128, 256]) at TP=2: vLLM splits the KV heads, each
    rank holds 64 rows, so a 128 block would straddle ranks (measured: `start (1) + length (1) exceeds
    dimension size (1)` in load_qkv_weight); block 64 fits every shard. With 1 KV head the rows replicate."""
    config = {**CONFIG, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    spec = {**SPEC, "config": config}
    shapes = {"model.layers.0.self_attn.q_proj.weight": (256, 256), "model.layers.0.self_attn.k_proj.weight": (128, 256),
              "model.layers.0.self_attn.v_proj.weight": (128, 256), "model.layers.0.self_attn.o_proj.weight": (256, 256)}
    assert quant.quantized("llama", spec, shapes, "fp8-block", [1, 2]).spec["quantize"][0]["block"] == [64, 128]
    assert quant.quantized("llama", spec, shapes, "fp8-block", [1]).spec["quantize"][0]["block"] == [128, 128]
    # one KV head of 128 (k_proj [128, 256]): every rank holds all 128 rows, a whole block
    one_kv = {**spec, "config": {**config, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}}
    assert quant.quantized("llama", one_kv, shapes, "fp8-block", [2]).spec["quantize"][0]["block"] == [128, 128]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_4bit_twin_of_a_type_vllm_refuses_float16_for_is_forged_in_bfloat16(method):
    """vLLM refuses float16 for gemma2 (vllm/config/model.py: numerical instability); its AWQ/GPTQ
    configs take bfloat16 on 0.32, so gemma2's twin is bfloat16, llama's stays float16."""
    assert quant.quantized("gemma2", {**SPEC, "model_type": "gemma2"}, SHAPES, method, [1]).spec["dtype"] == "bfloat16"
    assert quant.quantized("llama", SPEC, SHAPES, method, [1]).spec["dtype"] == "float16"
