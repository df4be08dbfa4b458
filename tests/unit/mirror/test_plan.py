"""plan.py shrinks a source into a twin whose invariants hold: full-size layouts built from
transformers' defaults for each family give small twins whose KV heads TP both splits and
replicates; the DSA seed keeps its FP8 indexer and dense first layer; a model_type only remote code
knows is planned as its architectures' class with its auto_map; experts and KV scales keep their
count when no width changes; and a twin that cannot serve the asked PP is refused, nothing written."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from servematrix.errors import UserError
from servematrix.mirror.cli import cli_mirror
from servematrix.mirror.diff import diff
from servematrix.mirror.dims import kv_class
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.layout import rules
from servematrix.mirror.source import read_local, read_source
from servematrix.mirror.twin import build_twin
from tests.unit.mirror.sources import seed


def test_the_dsa_seed_keeps_its_fp8_indexer_wk_with_block_scales_and_its_dense_first_layer(cache, tmp_path):
    _, seed_dir = seed("tiny-glm-5.1-dsa")
    plan = plan_twin(read_source(str(seed_dir)), max_pp=2, tp_values=[1, 2])
    assert plan.ok and plan.reproducible
    assert [b.tensors for b in plan.spec.fp8_blocks] == ["model.layers.*.self_attn.indexer.wk.weight"]
    assert plan.twin["model.layers.1.self_attn.indexer.wk.weight"].dtype == "F8_E4M3"
    assert plan.twin["model.layers.1.self_attn.indexer.wk.weight_scale_inv"].dtype == "F32"
    # 1 dense layer of 4: at PP=2 the source's first rank holds MoE layers, so the twin's must (#25):
    # 2 x (1 + 1) layers, here all four
    assert plan.spec.config["first_k_dense_replace"] == 1
    assert plan.spec.config["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]
    assert plan.layer_map == {0: 0, 1: 1, 2: 2, 3: 3}
    assert "model.layers.0.mlp.gate_proj.weight" in plan.twin and "model.layers.1.mlp.experts.3.up_proj.weight" in plan.twin


FAMILIES = ["minimax_m2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe", "qwen3_moe", "llama"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_full_size_meta_layout_from_transformers_defaults_gives_a_twin_whose_invariants_hold(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    source = read_source(f"model_type:{model_type}")
    assert source.kind == "model_type" and len(source.tensors) > 200  # full size, built on the meta device
    plan = plan_twin(source, max_pp=4, tp_values=[1, 2, 4, 8])
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    assert len(plan.kept_layers) >= 4 and len(plan.twin) < len(source.tensors)
    cfg = {**source.config, **{k: v[1] for k, v in plan.dims.items()}}
    if not source.structure.mla:
        kv = cfg["num_key_value_heads"]
        classes = {kv_class(kv, t) for t in (2, 4, 8)}
        assert classes == {"split", "replicated"}  # the TP values both split and replicate the KV heads
        assert cfg["num_attention_heads"] % kv == 0
    if source.structure.experts:
        assert plan.experts >= 2 * (cfg.get("num_experts_per_tok") or 1)
    # the size invariant's bound (glm_moe_dsa's defaults: 3 dense layers, so 8 twin layers for PP=2)
    assert sum(math.prod(m.shape) for m in plan.twin.values()) < rules()["targets"]["max_params"]


def test_a_twin_that_cannot_serve_the_asked_pp_is_refused_and_nothing_is_written(cache, tmp_path):
    _, seed_dir = seed("tiny-llama")
    plan = plan_twin(read_source(str(seed_dir)), max_pp=4, tp_values=[1, 2])
    assert not plan.ok and [i.name for i in plan.invariants if not i.holds] == ["layers"]
    with pytest.raises(UserError, match="layers"):
        cli_mirror(str(seed_dir), tmp_path / "twin.yaml", tmp_path / "twin", 4, [1, 2], "twin")
    assert not (tmp_path / "twin.yaml").exists() and not (tmp_path / "twin").exists()


def test_a_model_type_only_remote_code_knows_is_forged_as_its_architectures_class_with_its_auto_map(cache, tmp_path):
    _, seed_dir = seed("tiny-llama")
    src = shutil.copytree(seed_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="my_llama", auto_map={"AutoConfig": "configuration_my_llama.MyLlamaConfig",
                                                   "AutoModelForCausalLM": "modeling_my_llama.MyLlamaForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    source = read_source(str(src))
    plan = plan_twin(source, 2, [1, 2])
    assert plan.ok and (plan.spec.model_type, plan.spec.text_model_type, plan.spec.remote_code) == ("my_llama", "llama", True)
    twin = read_local(build_twin(plan, "my-llama-twin", tmp_path / "twin"))
    assert twin.model_type == "my_llama" and twin.auto_map["AutoConfig"].startswith("configuration_my_llama.")
    report = diff(source, twin)
    assert report.equal
    assert any(n.what == "auto_map ['AutoModelForCausalLM']" for n in report.not_mirrored)


def test_the_kvscale_seeds_experts_and_scales_keep_their_count_when_no_width_changes(cache):
    _, seed_dir = seed("tiny-minimax-m2-kvscale")
    plan = plan_twin(read_source(str(seed_dir)), 2, [1, 2])
    assert plan.experts == 4 and "num_local_experts" not in plan.dims
    (kv,) = plan.spec.quantize  # the seed's k_scale / v_scale extras, as the forge's kv_cache_scales
    assert (kv.method, kv.k_scale, kv.v_scale, kv.value) == ("kv_cache_scales", "model.layers.{layer}.self_attn.k_proj.k_scale",
                                                             "model.layers.{layer}.self_attn.v_proj.v_scale", 1.0)
    assert not plan.spec.extra_tensors
    assert plan.spec.config_json["quantization_config"]["ignored_layers"][-1] == "model.layers.1.mlp.experts"


# Every minimax_m2 twin died in vLLM with AttributeError: 'MiniMaxM2Config' object has no attribute
# 'rotary_dim': transformers' defaults lack it, vLLM reads it. mirror-families.yaml's
# model_type_config carries it (half of head_dim, as the real config.json) and the router fields.
def test_a_minimax_m2_twin_from_transformers_defaults_carries_rotary_dim_and_a_cpu_router_for_kv_heads_below_tp():
    from servematrix.mirror.cli import scenario_dict

    source = read_source("model_type:minimax_m2")
    assert source.config["rotary_dim"] == source.config["head_dim"] // 2 == 64
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2], kv_policy="replicate")
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    cfg = plan.spec.config
    assert cfg["rotary_dim"] * 2 == cfg["head_dim"] == 64  # the fraction survives the shrink
    assert cfg["num_key_value_heads"] == 1 and kv_class(1, 2) == "replicated"  # #38191's layout
    assert cfg["scoring_func"] == "softmax" and cfg["use_routing_bias"] is True
    text = scenario_dict(plan, "mm-twin", source)["description"]
    assert "scoring_func 'sigmoid' -> 'softmax'" in text and "cpu_config" in text


def test_a_checkpoint_without_rotary_dim_gets_it_filled_and_noted_while_its_own_value_wins(cache, tmp_path):
    _, seed_dir = seed("tiny-minimax-m2")
    src = shutil.copytree(seed_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    assert config["rotary_dim"] == 64 == config["head_dim"]
    own = plan_twin(read_source(str(src)), 2, [1, 2])
    assert own.spec.config["rotary_dim"] == 64 and not any("model_type_config" in n for n in own.notes)
    for key in ("rotary_dim", "partial_rotary_factor"):
        config.pop(key, None)
    config.get("rope_parameters", {}).pop("partial_rotary_factor", None)
    (src / "config.json").write_text(json.dumps(config))
    filled = plan_twin(read_source(str(src)), 2, [1, 2])
    assert filled.ok and filled.spec.config["rotary_dim"] == 32
    assert any("rotary_dim" in n and "model_type_config" in n for n in filled.notes)


def test_a_full_size_kv_scale_source_gives_a_twin_whose_scenario_forges_its_scales_and_kv_method(tmp_path):
    # #37214's layout from a mirror: k_scale / v_scale per layer, the fp8 config that gives attention a
    # KV-cache method (its ignored modules remapped onto the kept layers), remote code for 0.18.1
    from tests.unit.mirror.sources import minimax_kvscale_source

    source = read_source(str(minimax_kvscale_source(tmp_path / "src")))
    assert source.quant.kv_scales == 124 and source.structure.num_layers == 62
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2], kv_policy="replicate")
    assert plan.ok and plan.reproducible, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    assert [q.method for q in plan.spec.quantize] == ["kv_cache_scales"] and plan.spec.remote_code
    ignored = plan.spec.config_json["quantization_config"]["ignored_layers"]
    assert len(ignored) == 10 and {m.split(".")[2] for m in ignored} == {"0", "1"}
    assert plan.twin["model.layers.1.self_attn.k_proj.k_scale"].dtype == "F32"
    assert plan.spec.dtype == "bfloat16" and plan.spec.config["num_key_value_heads"] == 1


def test_a_configuration_class_that_types_its_token_ids_strictly_is_planned():
    # CwmConfig refuses bos_token_id None ("Field 'bos_token_id' expected int"); the plan builds the
    # shrunk class with ids inside the twin's vocab, the forge then writes its tokenizer's
    plan = plan_twin(read_source("model_type:cwm"), 2, [1, 2])
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]


def test_a_fused_qkv_proj_in_fp8_blocks_is_planned_whole_blocks_per_section_and_rank(tmp_path):
    """A checkpoint of Phi-3-mini's shape (its published config, data/configs) in 128x128 FP8 blocks, as
    DeepSeek-V3-FP8 lays them out: the fused qkv_proj's q, k and v sections (3072 rows each) are 24 blocks
    each. The twin keeps head_dim 96 and gets 8 KV heads, so at TP 1 and 2 every section a rank loads is
    whole blocks (768 / 384 rows); the quantized-dims invariant checks the sections, not the fused width
    (which was whole blocks at TP=2 also for the 2-KV-head twin planned before, whose 96-row k/v
    sections vLLM's load_qkv_weight cuts across blocks)."""
    from servematrix.mirror.dims import qkv_sections
    from servematrix.paths import data_file
    from tests.unit.mirror.sources import add_embeddings, quantized, write_checkpoint

    cfg = json.loads((data_file("configs") / "phi3" / "microsoft--Phi-3-mini-4k-instruct.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128]}
    modules = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        modules |= {p + "self_attn.qkv_proj": ("linear", [3 * 3072, 3072]),
                    p + "self_attn.o_proj": ("linear", [3072, 3072]),
                    p + "mlp.gate_up_proj": ("linear", [2 * 8192, 3072]), p + "mlp.down_proj": ("linear", [3072, 8192]),
                    p + "input_layernorm": ("norm", [3072]), p + "post_attention_layernorm": ("norm", [3072])}
    tensors = add_embeddings(quantized(modules, "fp8_block", "BF16"), 32064, 3072, "BF16", False)
    plan = plan_twin(read_source(str(write_checkpoint(tmp_path / "phi3-fp8", cfg, tensors, shards=2))), 1, [1, 2])
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    twin = plan.spec.config
    assert (twin["num_attention_heads"], twin["num_key_value_heads"], twin["hidden_size"]) == (8, 8, 768)
    assert [qkv_sections(twin, tp) for tp in (1, 2)] == [[768] * 3, [384] * 3]
    assert plan.twin["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (18, 6)  # 3 x 6 blocks of rows


def test_the_quantized_dims_invariant_fails_a_fused_qkv_proj_whose_sections_straddle_blocks():
    """The twin planned before for phi3 (8 heads, 2 KV heads of 96): its qkv_proj [1152, 768] is 9 whole
    128-row blocks at TP=1, but its k section starts at row 768 and is 192 rows, 1.5 blocks, which
    vLLM's fused loader reads as ceil(192 / 128) = 2 scale rows from row 6 (and v from row 8 of 9)."""
    from servematrix.mirror.checks import _quantized_dims
    from servematrix.mirror.plan_models import Plan, QuantTarget

    def plan(out: int) -> Plan:
        target = QuantTarget(prefix="model.layers.0.self_attn.qkv_proj", scheme="fp8_block", forge=True, out=out,
                             in_=768, params={"block_n": 128, "block_k": 128}, leaves={})
        return Plan.model_construct(tp=[1], quant=[target], not_mirrored=[])

    cfg = {"hidden_size": 768, "num_attention_heads": 8, "num_key_value_heads": 2}
    before = _quantized_dims(plan(1152), cfg)
    assert not before.holds and "out k 192 per rank at TP=1" in before.detail
    assert _quantized_dims(plan(2304), {**cfg, "num_key_value_heads": 8}).holds  # 768 rows a section
