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
    assert ForgeSpec.model_validate(q.spec).quantize[0].config([])["weight_block_size"] == [block_n, 128]


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
    fused = {k.replace("k_proj", "c_attn"): v for k, v in SHAPES.items() if "v_proj" not in k}
    q = quant.quantized("llama", SPEC, fused, "fp8-kv", [1])
    assert q.spec is None and "no layers.N.self_attn.k_proj or layers.N.mixer.k_proj" in q.reason


@pytest.mark.parametrize("prefix, attention", [("model.", "self_attn"), ("", "self_attn"), ("model.decoder.", "self_attn"),
                                               ("backbone.", "mixer")])
def test_kv_cache_scales_take_the_twins_own_prefix_and_attention_module(prefix, attention):
    # a bare encoder's layers (LlamaModel's twin: `layers.0...`), OPT's `model.decoder.`, Nemotron-H's `mixer`
    named = {prefix + k.removeprefix("model.").replace("self_attn", attention): v for k, v in SHAPES.items()}
    q = quant.quantized("llama", SPEC, named, "fp8-kv", [1])
    kv = q.spec["quantize"][-1]
    assert kv == {"method": "kv_cache_scales", "k_scale": f"{prefix}layers.{{layer}}.{attention}.k_proj.k_scale",
                  "v_scale": f"{prefix}layers.{{layer}}.{attention}.v_proj.v_scale", "value": 1.0}


def test_a_fused_qkv_projection_carries_both_kv_cache_scales():
    # Phi-3's qkv_proj: vLLM maps `.self_attn.qkv_proj.k_scale` / `.v_scale` to the attention's
    fused = {k.replace("q_proj", "qkv_proj"): (512, 256) if "q_proj" in k else v for k, v in WIDE.items()
             if "k_proj" not in k and "v_proj" not in k}
    kv = quant.quantized("llama", WIDE_SPEC, fused, "fp8-kv", [1]).spec["quantize"][-1]
    assert (kv["k_scale"], kv["v_scale"]) == ("model.layers.{layer}.self_attn.qkv_proj.k_scale",
                                              "model.layers.{layer}.self_attn.qkv_proj.v_scale")


def test_a_hybrid_whose_first_layer_has_no_attention_still_takes_kv_cache_scales():
    # Qwen3-Next / LFM2: linear-attention or convolution layers first, a k_proj only on the attention layers
    hybrid = {k: v for k, v in SHAPES.items() if not k.startswith("model.layers.0.self_attn.")}
    q = quant.quantized("llama", SPEC, hybrid, "fp8-kv", [1])
    assert q.reason is None and q.spec["quantize"][-1]["method"] == "kv_cache_scales"


# Qwen/Qwen3-30B-A3B-Thinking-2507-FP8's config.json, `quantization_config.modules_to_not_convert`, read in a
# dump of it (public code index id 62570066099): lm_head, then per layer these three, layers 0-47
PUBLISHED_NOT_CONVERTED = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(48)
                                         for m in ("input_layernorm", "mlp.gate", "post_attention_layernorm")]


# Qwen/Qwen3-Next-80B-A3B-Instruct-FP8's `modules_to_not_convert`, layers 0-3 (three linear-attention layers, then a
# full-attention one), read in a dump of its config (public code index id 63048263430)
_LINEAR = ["input_layernorm", "linear_attn.A_log", "linear_attn.conv1d", "linear_attn.dt_bias", "linear_attn.in_proj_ba",
           "linear_attn.norm", "mlp.gate", "mlp.shared_expert_gate", "post_attention_layernorm"]
_FULL = ["input_layernorm", "mlp.gate", "mlp.shared_expert_gate", "post_attention_layernorm", "self_attn.k_norm",
         "self_attn.q_norm"]
QWEN3_NEXT_NOT_CONVERTED = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(4) for m in (_FULL if i == 3 else _LINEAR)]


def test_qwen3_nexts_fp8_list_is_the_published_one_for_the_twins_layers():
    leaves = {"linear_attn.A_log": "", "linear_attn.dt_bias": ""}  # parameters of their own, not modules' weights
    linear = [*_LINEAR, "linear_attn.in_proj_qkvz", "linear_attn.out_proj", "mlp.experts.gate_up_proj"]
    full = [*_FULL, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names = [f"model.layers.{i}.{m}" + leaves.get(m, ".weight") for i in range(4) for m in (full if i == 3 else linear)]
    rule = quant.rules()["fp8-block"]
    method = quant._method(rule, ignore=rule.families["qwen3_next"].ignore)
    assert method.listed(names + ["model.embed_tokens.weight", "lm_head.weight"]) == QWEN3_NEXT_NOT_CONVERTED
    assert method.selects("model.layers.0.linear_attn.in_proj_qkvz.weight")
    assert not method.selects("model.layers.0.linear_attn.in_proj_ba.weight")


def test_qwen3_moes_fp8_twin_names_its_routers_not_converted_per_layer_as_the_published_config_does():
    layers = 3
    moe = {f"model.layers.{i}.{m}.weight": s for i in range(layers) for m, s in [
        ("self_attn.q_proj", (256, 256)), ("self_attn.k_proj", (128, 256)), ("self_attn.v_proj", (128, 256)),
        ("self_attn.o_proj", (256, 256)), ("mlp.gate", (8, 256)), ("input_layernorm", (256,)),
        ("post_attention_layernorm", (256,))]} | {"model.embed_tokens.weight": (512, 256), "lm_head.weight": (512, 256)}
    spec = {**WIDE_SPEC, "model_type": "qwen3_moe", "architecture": "Qwen3MoeForCausalLM"}
    q = quant.quantized("qwen3_moe", spec, moe, "fp8-block", [1])
    assert q.reason is None and "Qwen3-30B-A3B-Thinking-2507-FP8" in q.note
    (method,) = ForgeSpec.model_validate(q.spec).quantize
    listed = method.listed(moe)
    assert listed == [n for n in PUBLISHED_NOT_CONVERTED if n == "lm_head" or int(n.split(".")[2]) < layers]
    assert not method.selects("model.layers.2.mlp.gate.weight") and method.selects("model.layers.2.self_attn.q_proj.weight")
    assert method.config(listed)["ignored_layers"] == listed  # vLLM's Fp8Config matches these names exactly


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
    config = ForgeSpec.model_validate(q.spec).quantize[0].config([])
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


def test_a_linear_the_role_table_does_not_name_must_fit_every_way_vllm_may_split_it():
    # OPT's out_proj / fc2 are row-parallel in vLLM but not in mirror-families.yaml's tp_roles: planned as
    # whole, a 128-wide one took K blocks of 128 that its 64 inputs a rank at TP=2 could not hold
    for name in ("model.decoder.layers.0.self_attn.out_proj.weight", "model.decoder.layers.0.fc2.weight"):
        assert quant._fits(name, (128, 128), 64, 128, [1])
        assert not quant._fits(name, (128, 128), 64, 128, [2])  # 64 inputs a rank if vLLM splits them
        assert quant._fits(name, (128, 256), 64, 128, [2])  # whole, outputs split, inputs split: all fit
    assert quant._fits("model.layers.0.self_attn.o_proj.weight", (64, 256), 64, 128, [2])  # named: row only
    assert quant._fits("model.layers.0.self_attn.q_a_proj.weight", (128, 128), 128, 128, [2])  # replicated
    # Mamba-2's in_proj, cut by its config's sections: planned whole (Falcon-H1-7B's 6680 rows, 3340 a rank)
    assert quant._fits("model.layers.0.mamba.in_proj.weight", (6680, 128), 8, 128, [2])


def test_no_cpu_4bit_kernel_for_a_linear_or_an_awq_moe_is_a_cpu_refusal_and_an_old_gpus_capability_is_not():
    # the signatures of falcon_h1 / granitemoehybrid awq (a Mamba-2 in_proj, 6680 rows, not a multiple of
    # 32: CPUWNA16LinearKernel.can_implement) and granitemoe tp2-awq (moe_wna16.py MoeWNA16Config.__init__)
    linear = "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons:"
    assert quant.refused_on_cpu("awq", linear) and quant.refused_on_cpu("gptq", linear)
    said = ("ValueError: The quantization method moe_wna16 + awq is not supported for the current GPU. "
            "Minimum capability: 75. Current capability: {}.")
    assert quant.refused_on_cpu("awq", said.format(-1))
    assert not quant.refused_on_cpu("awq", said.format(70))  # a real GPU too old: a failure, not this build's
    assert not quant.refused_on_cpu("fp8-block", linear)


def test_a_family_with_no_checkable_layout_is_a_reason_not_a_spec(monkeypatch):
    from servematrix.sweep.rules import Family

    rule = quant.rules()["fp8-block"]
    families = {**rule.families, "llama": Family(checkable=False, why="no published layout to stand for")}
    monkeypatch.setitem(quant.rules(), "fp8-block", rule.model_copy(update={"families": families}))
    q = quant.quantized("llama", SPEC, SHAPES, "fp8-block", [1])
    assert q.spec is None and q.reason == "fp8-block: no published layout to stand for" and not q.narrow
    assert quant.quantized("gemma3n_text", SPEC, SHAPES, "fp8-kv", [1]).reason.startswith(
        "fp8-kv: vLLM builds Gemma 3n's altup projections in FP8")  # the data's own entry


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


def _phi3(heads: int, kv: int, hd: int = 96, ffn: int = 256) -> tuple[dict, dict]:
    """A phi3 twin's spec and shapes: one fused qkv_proj of heads + 2 x kv heads of `hd` rows (the family derives
    head_dim as hidden_size / heads), a fused gate_up_proj."""
    hidden = heads * hd
    config = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    spec = ForgeSpec(model_type="phi3", architecture="Phi3ForCausalLM", config=config).model_dump(mode="json")
    p = "model.layers.0."
    shapes = {p + "self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, hidden),
              p + "self_attn.o_proj.weight": (hidden, hidden),
              p + "mlp.gate_up_proj.weight": (2 * ffn, hidden), p + "mlp.down_proj.weight": (hidden, ffn)}
    return spec, shapes


def test_a_fused_qkv_projs_block_is_the_first_that_every_section_of_every_rank_holds():
    """vLLM's QKVParallelLinear loads a fused qkv_proj section by section (q, then k, then v, each split
    over the ranks), and each section's block-scale rows are ceil(rows / block_n): a block must divide
    each section a rank holds, not only the fused width. phi3's twin widened before (8 heads, 2 KV heads
    of 96) is 576 rows a rank at TP=2, which 64 divides, but its k/v sections are 96 rows a rank."""
    spec, shapes = _phi3(8, 2)
    q = quant.quantized("phi3", spec, shapes, "fp8-block", [2])
    assert q.spec["quantize"][0]["block"] == [32, 128]  # 384 / 96 / 96 rows: 32 is the first that fits all
    spec, shapes = _phi3(8, 8)  # as the mirror widens it now: 384 rows a section a rank
    assert quant.quantized("phi3", spec, shapes, "fp8-block", [1, 2]).spec["quantize"][0]["block"] == [128, 128]
    # 4-bit: every section whole packs of 8 (hd 96: 12 packs a head)
    assert quant.quantized("phi3", spec, shapes, "awq", [1, 2]).spec["quantize"][0]["group_size"] == 128


def test_a_fused_qkv_section_no_block_fits_is_the_reason():
    # 16 heads and 1 KV head of 24: qkv_proj [432, 384] is 27 blocks of 16, but its k and v sections are
    # 24 rows, no block of the list; every other linear takes 128
    spec, shapes = _phi3(16, 1, hd=24, ffn=256)
    q = quant.quantized("phi3", spec, shapes, "fp8-block", [1])
    assert q.spec is None and q.narrow and "qkv_proj [432, 384]" in q.reason and "o_proj" not in q.reason


def test_phi3s_published_config_widened_for_fp8_blocks_takes_128x128_blocks_at_tp1_and_tp2():
    """The sweep's phi3 twin (microsoft/Phi-3-mini-4k-instruct's published config, data/configs) re-planned
    with the fp8-block widening (data/sweep-quants.yaml `widen`): 8 heads and 8 KV heads of 96, each qkv
    section 384 rows a rank at TP=2, so the cell takes the 128x128 blocks real FP8 checkpoints use (the plan
    before gave 2 KV heads, 96-row k/v sections a rank: no 128 block)."""
    from servematrix import mirror
    from servematrix.sweep import corpus
    from servematrix.sweep.quant import widen_units

    base = mirror.plan_twin(corpus.layout(corpus.published("phi3")), 2, [1, 2])
    shapes = {n: tuple(t.shape) for n, t in base.forged.items()}
    narrow = quant.quantized("phi3", base.spec.model_dump(mode="json"), shapes, "fp8-block", [2])
    assert narrow.narrow  # the base twin (hidden 128) is 64 K a rank at TP=2
    units, why = widen_units("fp8-block", shapes)  # a fused qkv_proj is widened now
    wide = mirror.plan_twin(corpus.layout(corpus.published("phi3")), 2, [1, 2], align=units)
    assert wide.ok
    config = wide.spec.config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]) == (8, 8, 768)
    wide_shapes = {n: tuple(t.shape) for n, t in wide.forged.items()}
    assert wide_shapes["model.layers.0.self_attn.qkv_proj.weight"] == (2304, 768)
    for tp in (1, 2):
        q = quant.quantized("phi3", wide.spec.model_dump(mode="json"), wide_shapes, "fp8-block", [tp])
        assert q.spec["quantize"][0]["block"] == [128, 128], (tp, q.reason)


def test_a_note_names_the_decoder_weights_no_glob_selects_and_a_family_may_name_its_own():
    """InternLM2's attention (wqkv, wo: names no shared glob holds) is named per family in sweep-quants.yaml,
    so its layout quantizes it; without that rule the note would say it stays float, never "every decoder
    linear" alone. A router, which no glob selects, is named in the note."""
    shapes = {f"model.layers.0.{m}.weight": s for m, s in [
        ("attention.wqkv", (256, 128)), ("attention.wo", (128, 128)), ("feed_forward.w1", (256, 128)),
        ("feed_forward.w3", (256, 128)), ("feed_forward.w2", (128, 256)), ("attention_norm", (128,))]}
    q = quant.layout("internlm2", {}, shapes, "awq", [1])
    assert "not quantized" not in q.note and "InternLM2's attention" in q.note
    assert "*layers.*.attention.wqkv.weight" in q.spec["quantize"][0]["tensors"]
    other = quant.layout("some_family", {}, shapes, "awq", [1])
    assert other.note.endswith("not quantized (no glob of sweep-quants.yaml selects them): attention.wo, attention.wqkv")
    routed = quant.layout("some_family", {}, {**shapes, "model.layers.0.mlp.gate.weight": (8, 128)}, "gptq", [1])
    assert "attention.wqkv, mlp.gate" in routed.note
