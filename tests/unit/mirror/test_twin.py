"""twin.py writes a twin whose tensor names, dtypes and quantization_config equal its source's up to
the layer count: forged seeds mirror back through the forge (and their scenario YAML alone rebuilds
the twin), and header-only quantized sources (FP8 128x128 blocks, AWQ int32 packs, GPTQ, NVFP4,
FP8 per-tensor, DeepSeek-V3 FP8 with its MTP layer and partial blocks) come out in the source's
on-disk layout, by the forge (its `quantize:` option: then the scenario YAML alone rebuilds the
twin) or, where the forge has no option for the layout, by post-processing after it."""

from __future__ import annotations

import json

import pytest

from servematrix.checkpoint.forge import forge
from servematrix.config.forge_spec import ForgeSpec
from servematrix.config.scenario import ScenarioStore
from servematrix.mirror.cli import cli_diff, cli_mirror, scenario_dict, scenario_yaml
from servematrix.mirror.diff import diff
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_local, read_source
from servematrix.mirror.twin import build_twin
from tests.unit.mirror.sources import (add_embeddings, awq_source, deepseek_fp8_source, dense_layers, fp8_block_source,
                                       llama_like, quantized, seed, write_checkpoint)


@pytest.mark.parametrize("scenario, max_pp, tps", [("tiny-minimax-m2-kvscale", 2, [1, 2]),
                                                    ("tiny-glm-5.1-dsa", 4, [1, 2]),
                                                    ("tiny-llama", 2, [1, 2])])
def test_a_forged_seed_mirrors_back_with_equal_names_dtypes_and_quant_config(cache, tmp_path, scenario, max_pp, tps):
    spec, seed_dir = seed(scenario)
    source = read_source(str(seed_dir))
    name = "twin-" + scenario
    text = cli_mirror(str(seed_dir), tmp_path / f"{name}.yaml", tmp_path / "twin", max_pp, tps, name)
    twin = read_local(tmp_path / "twin")
    report = diff(source, twin)
    assert report.equal, report.render()
    assert "names, dtypes and quantization_config equal" in text
    assert {n: m.dtype for n, m in twin.tensors.items()} == {n: m.dtype for n, m in source.tensors.items()}
    assert twin.config.get("quantization_config") == source.config.get("quantization_config")
    assert twin.quant.schemes == source.quant.schemes and twin.quant.kv_scales == source.quant.kv_scales
    # the scenario YAML alone rebuilds this twin: its ForgeSpec is the one forged, and nothing was post-processed
    written = ScenarioStore(tmp_path).get(name)  # as `servematrix run` loads it
    forged_spec = json.loads((tmp_path / "twin" / "forge.json").read_text())["spec"]
    assert written.model.forge == ForgeSpec(**forged_spec)
    assert "Post-processed" not in written.description and twin.origin.post_processed == []
    if scenario == "tiny-minimax-m2-kvscale":  # the seed's extra_tensors scales come back as `quantize:`
        assert [q.method for q in written.model.forge.quantize] == ["kv_cache_scales"]
        assert not any(e.name.endswith("_scale") for e in written.model.forge.extra_tensors)


def test_a_header_only_fp8_block_checkpoint_mirrors_with_its_scale_inv_tensors_and_the_forge_writes_them(cache, tmp_path):
    source = read_source(str(fp8_block_source(tmp_path / "qwen3-fp8")))
    assert source.quant.schemes == {"fp8_block": 36 * 7} and source.quant.weight_block_size == [128, 128]
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2, 4])
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    assert plan.reproducible  # whole 128x128 blocks: the forge's fp8_blocks write them
    cfg = plan.spec.config
    # 2 KV heads of 128 (split at TP=2, replicated at TP=4): one KV head per rank is one whole block
    assert cfg["num_key_value_heads"] == 2 and plan.twin["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * 128
    assert cfg["num_attention_heads"] % 4 == 0 and cfg["intermediate_size"] % (4 * 128) == 0
    twin_dir = build_twin(plan, "qwen3-fp8-twin", tmp_path / "twin")
    twin = read_local(twin_dir)
    assert twin.tensors["model.layers.1.self_attn.k_proj.weight"].dtype == "F8_E4M3"
    assert twin.tensors["model.layers.1.self_attn.k_proj.weight_scale_inv"].shape == (2, 1)
    assert twin.tensors["model.layers.1.mlp.down_proj.weight_scale_inv"].shape == (1, cfg["intermediate_size"] // 128)
    assert twin.quant.config == source.quant.config and twin.quant.schemes == {"fp8_block": 2 * 7}
    report = diff(source, twin)
    assert report.equal, report.render()
    assert report.layer_map[35] == 1 and report.layer_map[0] == 0


def _rebuilt_from_yaml(tmp_path, name: str):
    """The twin `servematrix run` forges from the scenario file alone (no mirror.json, no post-processing)."""
    return forge(name, ScenarioStore(tmp_path).get(name).model.forge)


def test_a_header_only_awq_checkpoint_mirrors_its_int32_packs_and_the_scenario_yaml_alone_rebuilds_it(cache, tmp_path):
    source = read_source(str(awq_source(tmp_path / "qwen2-awq")))
    assert source.quant.schemes == {"awq": 28 * 7} and (source.quant.bits, source.quant.group_size) == (4, 128)
    assert source.structure.tied_embeddings and not source.structure.lm_head
    text = cli_mirror(str(tmp_path / "qwen2-awq"), tmp_path / "awq-twin.yaml", tmp_path / "twin", 2, [1, 2], "awq-twin")
    twin = read_local(tmp_path / "twin")
    hidden = twin.config["hidden_size"]
    ffn = twin.config["intermediate_size"]
    assert (twin.tensors["model.layers.0.mlp.down_proj.qweight"].dtype,
            twin.tensors["model.layers.0.mlp.down_proj.qweight"].shape) == ("I32", (ffn, hidden // 8))
    assert twin.tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (ffn // 128, hidden // 8)
    assert twin.tensors["model.layers.0.mlp.down_proj.scales"].dtype == "F16"
    assert "model.layers.1.self_attn.q_proj.weight" not in twin.tensors and "lm_head.weight" not in twin.tensors
    assert (ffn // 2) % 128 == 0  # TP=2 splits down_proj's in_features into whole groups
    report = diff(source, twin)
    assert report.equal, report.render()
    written = ScenarioStore(tmp_path).get("awq-twin")
    (q,) = written.model.forge.quantize
    assert (q.method, q.group_size, q.scales_dtype, q.tensors) == ("awq", 128, "float16", ["model.layers.*.mlp.down_proj.weight",
        "model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight", "model.layers.*.self_attn.k_proj.weight",
        "model.layers.*.self_attn.o_proj.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.v_proj.weight"])
    assert "Post-processed" not in written.description and "reproducible from the scenario YAML alone" in text
    assert list(written.quants) == ["awq"] and twin.origin.post_processed == []
    rendered, equal = cli_diff(str(tmp_path / "qwen2-awq"), str(_rebuilt_from_yaml(tmp_path, "awq-twin")))
    assert equal, rendered


@pytest.mark.parametrize("scheme, qc, leaves", [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True},
     {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}),
    ("nvfp4", {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8",
               "exclude_modules": ["lm_head"] + [f"model.layers.{i}.self_attn*" for i in range(4)]},
     {"weight": "U8", "weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"}),
    ("fp8_tensor", {"quant_method": "fp8", "activation_scheme": "static"},
     {"weight": "F8_E4M3", "weight_scale": "F32", "input_scale": "F32"}),
])
def test_gptq_nvfp4_and_fp8_per_tensor_layouts_are_forged_in_the_source_leaves_and_dtypes(cache, tmp_path, scheme, qc, leaves):
    float_dtype = "F16" if scheme == "gptq" else "BF16"
    t = quantized(dense_layers(4, 512, 8, 2, 64, 1024), scheme, float_dtype)
    if scheme == "nvfp4":  # ModelOpt's FP8 KV cache: a k_scale / v_scale per layer
        for i in range(4):
            t[f"model.layers.{i}.self_attn.k_proj.k_scale"] = ("F32", [])
            t[f"model.layers.{i}.self_attn.v_proj.v_scale"] = ("F32", [])
    if scheme == "fp8_tensor":  # norms kept in float32 and rotary buffers saved, as some exports do
        for i in range(4):
            t[f"model.layers.{i}.input_layernorm.weight"] = ("F32", [512])
            t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = ("F32", [32])
    cfg = llama_like("llama", 4, 512, 8, 2, 64, 1024, 1000, quantization_config=qc)
    write_checkpoint(tmp_path / "src", cfg, add_embeddings(t, 1000, 512, float_dtype, False))
    source = read_source(str(tmp_path / "src"))
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2])
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    assert "quantize" not in {s.op for s in plan.post} and all(t.forge for t in plan.quant)
    kv = ["kv_cache_scales"] if scheme == "nvfp4" else []  # its k_scale / v_scale: written by `quantize:` too
    assert [q.method for q in plan.spec.quantize] == [scheme.replace("_", "-")] + kv
    twin = read_local(build_twin(plan, f"{scheme}-twin", tmp_path / "twin"))
    for leaf, dtype in leaves.items():
        assert twin.tensors[f"model.layers.1.mlp.up_proj.{leaf}"].dtype == dtype, leaf
    report = diff(source, twin)
    assert report.equal, report.render()
    if scheme == "fp8_tensor":  # the forge writes BF16 norms: cast back; inv_freq: a forge extra in every layer
        assert {s.op for s in plan.post} == {"cast"}
        assert twin.tensors["model.layers.1.input_layernorm.weight"].dtype == "F32"
        assert any(e.name == "model.layers.{layer}.self_attn.rotary_emb.inv_freq" for e in plan.spec.extra_tensors)
    else:  # the scenario YAML alone rebuilds it: `mirror --diff SOURCE REBUILT` is equal
        assert plan.reproducible
        (tmp_path / "yaml").mkdir()
        (tmp_path / "yaml" / f"{scheme}-twin.yaml").write_text(scenario_yaml(plan, f"{scheme}-twin", source))
        rendered, equal = cli_diff(str(tmp_path / "src"), str(_rebuilt_from_yaml(tmp_path / "yaml", f"{scheme}-twin")))
        assert equal, rendered
    if scheme == "nvfp4":
        assert twin.quant.config["exclude_modules"] == ["lm_head", "model.layers.0.self_attn*", "model.layers.1.self_attn*"]
        assert twin.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"
        assert twin.tensors["model.layers.1.self_attn.k_proj.k_scale"].shape == ()


def test_a_layout_the_forge_has_no_option_for_is_still_post_processed_and_said_so(cache, tmp_path):
    # FP8 with a per-channel weight_scale [n, 1]: quantize's fp8-tensor writes per-tensor scales only
    t = quantized(dense_layers(2, 256, 4, 2, 64, 512), "fp8_tensor", "BF16")
    for name, (dtype, shape) in list(t.items()):
        if name.endswith(".weight_scale"):
            t[name] = ("F32", [t[name[: -len("_scale")]][1][0], 1])
    cfg = llama_like("llama", 2, 256, 4, 2, 64, 512, 1000, quantization_config={"quant_method": "fp8",
                                                                               "activation_scheme": "static"})
    write_checkpoint(tmp_path / "src", cfg, add_embeddings(t, 1000, 256, "BF16", False))
    source = read_source(str(tmp_path / "src"))
    text = cli_mirror(str(tmp_path / "src"), tmp_path / "ch-twin.yaml", tmp_path / "twin", 2, [1], "ch-twin")
    twin = read_local(tmp_path / "twin")
    assert twin.tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (twin.config["intermediate_size"], 1)
    assert diff(source, twin).equal and "needs post-processing" in text
    written = ScenarioStore(tmp_path).get("ch-twin")
    assert written.model.forge.quantize == [] and "fp8_tensor layout" in written.description


def test_a_deepseek_fp8_checkpoint_keeps_its_mtp_layer_router_groups_and_partial_blocks(cache, tmp_path):
    source = read_source(str(deepseek_fp8_source(tmp_path / "dsv3")))
    st = source.structure
    assert (st.mla, st.moe, st.first_dense, st.mtp_layers, st.mtp_layer_indices) == (True, True, 1, 1, [5])
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2, 4])
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    k = len(plan.kept_layers)
    assert plan.layer_map[5] == k
    assert f"model.layers.{k}.eh_proj.weight" in plan.twin and plan.twin[f"model.layers.{k}.eh_proj.weight"].shape == (128, 256)
    assert plan.twin[f"model.layers.{k}.mlp.experts.0.gate_proj.weight"].dtype == "F8_E4M3"
    cfg = plan.spec.config
    assert (cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]) == (2, 1, 2)
    assert cfg["n_routed_experts"] % 2 == 0 and cfg["n_routed_experts"] >= 4
    assert cfg.get("kv_lora_rank", 512) == 512  # FlashMLA's latent width is kept
    # kv_a_proj_with_mqa is 512 + 64 = 576 rows: a partial last block, as in the source, written by post-processing
    partial = [t for t in plan.quant if not t.forge]
    assert partial and all(t.prefix.endswith("kv_a_proj_with_mqa") for t in partial)
    twin = read_local(build_twin(plan, "dsv3-twin", tmp_path / "twin"))
    assert (twin.structure.mtp_layers, twin.structure.mtp_layer_indices) == (1, [k])
    assert twin.tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 1)
    report = diff(source, twin)
    assert report.equal, report.render()
    assert scenario_dict(plan, "dsv3-twin", source)["load_check"]["devices"] == ["cpu"]
