"""Native twins (sweep/native.py, data/sweep-native.yaml): architectures transformers has no class
for, checked from a config of the family and the layout vLLM's own class expects. The data's configs
are shrunk under the sweep's invariants; the registry sweeps them under their own name; the load
check reads an unknown model_type as a plain PretrainedConfig with the remote class's aliases."""

from __future__ import annotations

import json
import sys

import pytest

from servematrix.serve import loadcheck
from servematrix.sweep import native, registry
from servematrix.sweep.cells import cells, layouts

FAMILIES = [f.arch for f in native.rules().families]


def test_every_family_names_where_its_config_was_read():
    for fam in native.rules().families:
        assert fam.found and fam.config.get("model_type", fam.model_type) == fam.model_type, fam.arch
        assert fam.config.get("architectures") == [fam.published_as or fam.arch], fam.arch
        if fam.origin == "published":
            assert fam.hub, fam.arch
        if fam.aliases:
            assert fam.aliases_found, fam.arch


def test_a_layer_template_renames_every_layer_and_an_exact_rule_comes_first():
    """TeleChat2's published spelling (transformer.h.N.*, its published weight map) for every layer the
    twin has, whatever its depth; names no rule covers stay as derived."""
    fam = native.family("TeleChat2ForCausalLM")
    assert native.renamed(fam, "model.layers.7.self_attn.k_proj.weight") == "transformer.h.7.self_attention.key.weight"
    assert native.renamed(fam, "model.h.12.mlp.down_proj.bias") == "transformer.h.12.mlp.down_proj.bias"
    assert native.renamed(fam, "model.word_embeddings.weight") == "transformer.word_embeddings.weight"
    assert native.renamed(fam, "lm_head.weight") == "lm_head.weight"


def test_a_published_spelling_vllm_does_not_register_is_said_in_every_cells_note():
    fam = native.family("TeleChat3ForCausalLM")
    assert fam.config["architectures"] == ["Telechat3ForCausalLM"] and fam.published_as == "Telechat3ForCausalLM"
    assert "names the architecture Telechat3ForCausalLM, a name vLLM's registry does not list" in native.label(fam)


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_twin_config_splits_under_every_layout(arch):
    """Layers >= the largest PP; heads, KV heads and experts whole per rank at TP 1 and 2."""
    fam = native.family(arch)
    cfg = native.twin_config(fam, 2, [1, 2], 1024)
    roles = native._roles()

    def value(role):
        return next((cfg[k] for k in roles[role] if isinstance(cfg.get(k), int)), None)

    assert value("layers") >= 2
    heads, kv, experts = value("heads"), value("kv_heads"), value("experts")
    assert heads % 2 == 0
    kv = kv or cfg.get("multi_query_group_num") or heads
    assert kv % 2 == 0 or 2 % kv == 0
    if experts is not None:
        assert experts % 2 == 0
    assert cfg["architectures"] == [arch] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["vocab_size"] == 1024
    assert not set(cfg) & set(native.DROPPED)


def test_the_published_values_that_are_no_size_are_kept_verbatim():
    cfg = native.twin_config(native.family("InternLM2ForCausalLM"), 2, [1, 2], 1024)
    assert cfg["rope_scaling"] == {"factor": 2.0, "type": "dynamic"} and cfg["rope_theta"] == 1000000
    assert cfg["bias"] is False and cfg["rms_norm_eps"] == 1e-05
    # grouped-query attention stays grouped: the published 32 heads share 8 KV heads
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    exaone = native.twin_config(native.family("ExaoneForCausalLM"), 2, [1, 2], 1024)
    assert exaone["num_layers"] == 2 and "num_hidden_layers" not in exaone  # the published spelling only
    assert exaone["activation_function"] == "silu" and exaone["rope_theta"] == 500000.0


def test_chatglm_carries_the_vocabulary_in_the_spelling_its_class_reads():
    cfg = native.twin_config(native.family("ChatGLMModel"), 2, [1, 2], 1024)
    assert cfg["padded_vocab_size"] == 1024 == cfg["vocab_size"]
    assert cfg["num_layers"] == 2 and cfg["multi_query_group_num"] == 2 and cfg["kv_channels"] == 16


def test_transformers_defaults_fill_a_family_known_under_another_class_name():
    cfg = native.twin_config(native.family("PhiMoEForCausalLM"), 2, [1, 2], 1024)
    assert cfg["architectures"] == ["PhiMoEForCausalLM"] and cfg["model_type"] == "phimoe"
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2


def test_the_registry_sweeps_a_native_family_under_its_own_name():
    arch = registry.classify("InternLM2ForCausalLM", "text")
    assert arch.forgeable and arch.native and arch.model_type == "internlm2"
    assert arch.key == "InternLM2ForCausalLM"
    ids = [c.id for c in cells([arch], layouts("tp1,tp2"), ["none"], ["0.32.0"])]
    assert "InternLM2ForCausalLM/tp1-none" in ids[0]
    assert "native" in cells([arch], layouts("tp1"), ["none"], ["0.32.0"])[0].tags
    other = registry.classify("Param2MoEForCausalLM", "text")
    assert not other.forgeable and "has no class" in other.reason


def test_the_load_check_is_told_which_model_types_to_read_plainly(tmp_path):
    from servematrix.serve.server import LaunchSpec

    spec = LaunchSpec(argv=[sys.executable, "-m", loadcheck.SERVER_MODULE, "--model", "x"], env={}, port=0,
                      log_path=tmp_path / "log", startup_timeout=1)
    check = loadcheck.Check(out=tmp_path, config_types=["exaone:num_hidden_layers=num_layers"])
    assert "--loadcheck-config-type=exaone:num_hidden_layers=num_layers" in loadcheck.command(spec, check)


def test_a_plain_config_reads_every_json_field_and_the_remote_class_aliases(tmp_path):
    """The worker's registration, in this process: transformers' AutoConfig reads the json with
    nothing derived, and the alias answers under the name vLLM's model reads."""
    import importlib.util

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    worker = importlib.util.spec_from_file_location("worker_under_test", loadcheck.WORKER)
    module = importlib.util.module_from_spec(worker)
    worker.loader.exec_module(module)
    model_type = "servematrix_native_test"
    try:
        assert module.register_config_types([f"{model_type}:num_hidden_layers=num_layers"])
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_layers": 3,
                                                          "activation_function": "silu"}))
        cfg = AutoConfig.from_pretrained(tmp_path)
        assert cfg.num_hidden_layers == 3 and cfg.activation_function == "silu"
        assert not hasattr(cfg, "hidden_act")  # nothing derived: a miss stays a miss
        assert module.register_config_types(["llama"]) == []  # a class transformers has is left to it
    finally:
        CONFIG_MAPPING._extra_content.pop(model_type, None)


def test_a_published_weight_map_is_compared_by_its_first_layer(monkeypatch):
    fam = native.family("ExaoneForCausalLM").model_copy(update={"weight_map_names": [
        "transformer.wte.weight", "transformer.h.0.ln_1.weight"]})
    assert native.compare(fam, ["transformer.wte.weight", "transformer.h.0.ln_1.weight",
                                "transformer.h.1.ln_1.weight"]) == []
    assert native.compare(fam, ["transformer.wte.weight"]) == [
        "published, not in the twin: transformer.h.0.ln_1.weight"]



FP8_UNITS = {"all": 128, "ffn": 128, "kv_out": 128, "attn_out": 128, "attn_in": 128}  # sweep-quants.yaml fp8 widen


def test_a_widened_twin_holds_whole_units_in_every_tp_shard():
    """FP8's 128x128 blocks at TP 1 and 2: a rank's one KV head, its two query heads in the attention's
    outputs and the output projection's inputs, the hidden size and each feed-forward shard, whole."""
    w = native.widths([1, 2], FP8_UNITS)
    assert w == native.Widths(head_dim=128, ffn=256, moe_ffn=256)
    assert native.widths([1, 2]) == native.Widths(16, 128, 64)  # unquantized: the defaults
    cfg = native.twin_config(native.family("InternLM3ForCausalLM"), 2, [1, 2], 1024, w=w)
    assert cfg["hidden_size"] == 512 and cfg["intermediate_size"] == 256 and cfg["head_dim"] == 128
    for tp in (1, 2):
        assert cfg["num_key_value_heads"] // tp * cfg["head_dim"] % 128 == 0
        assert cfg["num_attention_heads"] // tp * cfg["head_dim"] % 128 == 0 and cfg["intermediate_size"] // tp % 128 == 0


def test_a_family_s_own_width_fields_follow_the_twin_s_widths():
    """ChatGLM's ffn_hidden_size and kv_channels, which no role covers, are named in the data as the twin's
    widths, so the widened twin widens them too."""
    fam = native.family("ChatGLMModel")
    assert fam.twin["ffn_hidden_size"] == "{ffn}" and fam.twin["kv_channels"] == "{head_dim}"
    wide = native.twin_config(fam, 2, [1, 2], 1024, w=native.widths([1, 2], FP8_UNITS))
    assert wide["ffn_hidden_size"] == 256 and wide["kv_channels"] == 128 and wide["hidden_size"] == 512
    assert native.twin_config(fam, 2, [1, 2], 1024)["ffn_hidden_size"] == 128


def _native_like(directory, tensors):
    import torch
    from safetensors.torch import save_file

    from servematrix.sweep.twins import Twin

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "internlm3", "torch_dtype": "bfloat16"}))
    (directory / "tokenizer.json").write_text("{}")
    gen = torch.Generator().manual_seed(0)
    save_file({n: (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in tensors.items()},
              str(directory / "model.safetensors"))
    return Twin(model_type="internlm3", architecture="InternLM3ForCausalLM", path=str(directory),
                shapes={n: tuple(s) for n, s in tensors.items()}, config_types=["internlm3"])


def test_a_native_twin_is_quantized_from_its_own_weights_by_the_forge_s_writer(tmp_path):
    """FP8 blocks with their scales and the KV-cache scales, as quant.layout() plans them for the twin's
    shapes; the quantization_config they imply; what no method selects stays as it was."""
    import torch
    from safetensors.torch import load_file

    from servematrix.checkpoint.quant_pack import dequantize
    from servematrix.config.quantize import Fp8Block
    from servematrix.sweep import quant

    shapes = {"model.layers.0.self_attn.q_proj.weight": [256, 256], "model.layers.0.self_attn.k_proj.weight": [128, 256],
              "model.layers.0.self_attn.v_proj.weight": [128, 256], "model.layers.0.mlp.down_proj.weight": [256, 256],
              "model.layers.0.input_layernorm.weight": [256], "model.embed_tokens.weight": [64, 256]}
    base = _native_like(tmp_path / "twin", shapes)
    plan = quant.layout("internlm3", {}, base.shapes, "fp8-kv", [1])
    assert plan.spec is not None and "k_scale / v_scale" in plan.note
    path = native.quantized(base, plan.spec, "fp8-kv")
    out = load_file(path / "model.safetensors")
    before = load_file(tmp_path / "twin" / "model.safetensors")
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and out["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (2, 2)
    method = Fp8Block.model_validate(plan.spec["quantize"][0])
    back = dequantize(method, {"weight": q, "weight_scale_inv": out["model.layers.0.self_attn.q_proj.weight_scale_inv"]})
    w = before["model.layers.0.self_attn.q_proj.weight"].float()
    assert (back - w).abs().max() <= w.abs().max() / 8  # e4m3's 3 mantissa bits: the twin's values, not new ones
    assert out["model.layers.0.self_attn.k_proj.k_scale"].item() == 1.0 and "model.layers.0.self_attn.v_proj.v_scale" in out
    assert torch.equal(out["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["quantization_config"]["weight_block_size"]
    assert (path / "tokenizer.json").is_file() and native.quantized(base, plan.spec, "fp8-kv") == path  # reused


def test_a_native_twin_in_awq_is_written_in_float16_throughout(tmp_path):
    import torch
    from safetensors.torch import load_file

    from servematrix.sweep import quant

    shapes = {"model.layers.0.mlp.up_proj.weight": [128, 128], "model.layers.0.input_layernorm.weight": [128]}
    base = _native_like(tmp_path / "twin", shapes)
    plan = quant.layout("internlm3", {}, base.shapes, "awq", [1])
    path = native.quantized(base, plan.spec, "awq")
    out = load_file(path / "model.safetensors")
    assert out["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int32
    assert out["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16
    assert out["model.layers.0.input_layernorm.weight"].dtype == torch.float16
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["quantization_config"]["quant_method"] == "awq"


def test_a_layout_other_than_quantize_entries_is_refused_with_its_reason(tmp_path):
    base = _native_like(tmp_path / "twin", {"model.layers.0.mlp.up_proj.weight": [128, 128]})
    why = native.quantized(base, {"fp8_blocks": [{"tensors": "*", "block": [128, 128]}]}, "fp8-block")
    assert isinstance(why, str) and "takes a `quantize:` layout only" in why
