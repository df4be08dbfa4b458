"""The forge writes what the real checkpoint carries and refuses a config that drifts from the
family's transformers class."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from safetensors import safe_open

from servematrix.checkpoint.forge import check_config, forge, read_field
from servematrix.config.forge_spec import MAX_FORGE_PARAMS, ExtraTensor, ForgeSpec, model_params

TINY = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 256}


def spec(config=TINY, **kw):
    return ForgeSpec(model_type="llama", architecture="LlamaForCausalLM", config=config,
                     tokenizer={"vocab_size": 300, "chat_template": False}, **kw)


@pytest.fixture(scope="module")
def kvscale_checkpoint():
    s = spec(extra_tensors=[ExtraTensor(name="model.layers.{layer}.self_attn.k_proj.k_scale", value=0.5)],
             config_json={"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}},
             remote_code=True)
    return forge("unit-kvscale", s)


def test_extra_tensors_are_written_for_every_layer_as_f32_scalars(kvscale_checkpoint):
    (path,) = kvscale_checkpoint.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        assert {"model.layers.0.self_attn.k_proj.k_scale", "model.layers.1.self_attn.k_proj.k_scale"} <= names
        t = f.get_tensor("model.layers.1.self_attn.k_proj.k_scale")
    assert t.shape == () and t.dtype.is_floating_point and float(t) == 0.5


def test_config_json_fields_and_the_remote_code_config_module_are_shipped(kvscale_checkpoint):
    config = json.loads((kvscale_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["auto_map"] == {"AutoConfig": "configuration_llama.LlamaConfig"}
    assert (kvscale_checkpoint / "configuration_llama.py").is_file()
    from transformers import AutoConfig

    remote = AutoConfig.from_pretrained(kvscale_checkpoint, trust_remote_code=True)
    assert type(remote).__module__.endswith("configuration_llama") and remote.hidden_size == 64


def test_a_config_the_family_class_would_change_is_refused(tmp_path, kvscale_checkpoint):
    drifted = spec(config={**TINY, "num_hidden_layers": 3})  # the written config.json says 2
    with pytest.raises(ValueError, match="num_hidden_layers: 3 became 2"):
        check_config(kvscale_checkpoint, drifted)
    other = ForgeSpec(model_type="mistral", architecture="LlamaForCausalLM", config=TINY)
    with pytest.raises(ValueError, match="model_type 'llama' != 'mistral'"):
        check_config(kvscale_checkpoint, other)


def test_fields_the_family_class_does_not_declare_are_listed_not_refused(kvscale_checkpoint):
    assert check_config(kvscale_checkpoint, spec()) == []
    meta = json.loads((kvscale_checkpoint / "forge.json").read_text())
    assert meta["fields_not_in_config_class"] == []


def test_fp8_blocks_store_the_weight_as_e4m3_with_one_scale_per_128x128_block_that_vllm_dequantizes_back():
    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize

    from servematrix.checkpoint.quant_pack import fp8_block_quantize

    weight = torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * 0.3
    weight[:128, :128] *= 50  # one block far larger than the rest: its scale must not leak into others
    q, scale_inv = fp8_block_quantize(weight, [128, 128])
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (2, 3)
    back = scaled_dequantize(q, scale_inv, group_shape=GroupShape(128, 128), out_dtype=torch.float32)
    rel = ((back - weight).abs() / weight.abs().clamp(min=1e-3)).median()
    assert rel < 0.07  # e4m3 keeps 3 mantissa bits: ~6% worst-case rounding, far less in the median
    assert (back[128:, 128:] - weight[128:, 128:]).abs().max() < 0.1


def test_fp8_blocks_refuse_a_shape_that_is_not_whole_blocks():
    import torch

    from servematrix.checkpoint.quant_pack import fp8_block_quantize

    with pytest.raises(ValueError, match="multiple of the \\[128, 128\\] FP8 block"):
        fp8_block_quantize(torch.zeros(128, 100), [128, 128])


def test_fp8_blocks_write_weight_and_weight_scale_inv_and_refuse_a_pattern_matching_nothing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    cfg = {**TINY, "hidden_size": 128, "intermediate_size": 256, "head_dim": 64}
    path = forge("unit-fp8", spec(config=cfg, fp8_blocks=[{"tensors": "model.layers.*.mlp.up_proj.weight"}]))
    (st,) = path.glob("*.safetensors")
    with safe_open(str(st), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        assert list(f.get_tensor("model.layers.1.mlp.up_proj.weight_scale_inv").shape) == [2, 1]
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.float32
    with pytest.raises(ValueError, match="no tensor matches"):
        forge("unit-fp8-none", spec(config=cfg, fp8_blocks=[{"tensors": "model.layers.*.indexer.wk.weight"}]))


COMPOSITE = dict(
    model_type="minicpmv", architecture="MiniCPMV", text_model_type="llama", text_prefix="llm.",
    config={**TINY, "head_dim": 32}, remote_code=True,
    components=[{"model_type": "siglip_vision_model", "prefix": "vpm.", "strip": "vision_model.",
                 "config_key": "vision_config",
                 "config": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2,
                            "num_hidden_layers": 1, "image_size": 56, "patch_size": 14}}],
    extra_tensors=[{"name": "resampler.kv_proj.weight", "shape": [64, 48], "random": True}],
    config_json={"version": "4.0"},
)


def test_a_composite_checkpoint_holds_each_part_under_its_prefix_with_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    path = forge("unit-composite", ForgeSpec(**COMPOSITE, tokenizer={"vocab_size": 300, "chat_template": False}))
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["version"]) == ("minicpmv", ["MiniCPMV"], "4.0")
    assert config["hidden_size"] == 64 and config["vision_config"]["hidden_size"] == 48
    assert config["auto_map"]["AutoConfig"].startswith("configuration_minicpmv.")
    (st,) = path.glob("*.safetensors")
    with safe_open(str(st), "pt") as f:
        names = set(f.keys())
        kv = f.get_tensor("resampler.kv_proj.weight")
    assert "llm.model.layers.0.self_attn.q_proj.weight" in names and "llm.lm_head.weight" in names
    assert "vpm.encoder.layers.0.self_attn.q_proj.weight" in names and "vpm.post_layernorm.weight" in names
    assert not any(n.startswith(("model.", "vision_model.", "vpm.vision_model.")) for n in names)
    assert kv.shape == (64, 48) and kv.std() > 0.1  # random, not a constant


def test_a_composite_is_read_back_part_by_part_and_a_drifted_part_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    good = ForgeSpec(**COMPOSITE, tokenizer={"vocab_size": 300, "chat_template": False})
    path = forge("unit-composite", good)
    assert check_config(path, good) == []
    vision = COMPOSITE["components"][0]
    drifted = ForgeSpec(**{**COMPOSITE, "components": [{**vision, "config": {**vision["config"], "hidden_size": 50}}]},
                        tokenizer={"vocab_size": 300, "chat_template": False})
    with pytest.raises(ValueError, match="vision_config.hidden_size: 50 became 48"):
        check_config(path, drifted)
    text = ForgeSpec(**{**COMPOSITE, "config": {**COMPOSITE["config"], "num_hidden_layers": 3}},
                     tokenizer={"vocab_size": 300, "chat_template": False})
    with pytest.raises(ValueError, match="num_hidden_layers: 3 became 2"):
        check_config(path, text)


# --- what a spec may ask for: bounded before anything is built -----------------------------------
REPO = Path(__file__).resolve().parents[3]
FORGED = {p.stem: yaml.safe_load(p.read_text())["model"]["forge"] for p in sorted((REPO / "scenarios").glob("*.yaml"))
          if "forge" in yaml.safe_load(p.read_text())["model"]}


def _real_params(model_type: str, config: dict, vocab: int, causal: bool = True) -> int:
    """The parameters transformers' own class builds for this config (on the meta device: nothing
    is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **config, **({"vocab_size": vocab} if causal else {}))
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FORGED))
def test_the_estimate_is_never_below_what_transformers_builds_for_a_shipped_spec(name):
    s = ForgeSpec.model_validate(FORGED[name])
    vocab = s.tokenizer.vocab_size
    assert model_params(s.config, vocab) >= _real_params(s.text_model_type or s.model_type, s.config, vocab)
    for c in s.components:
        assert model_params(c.config) >= _real_params(c.model_type, c.config, 0, causal=False)


def _refused(**changes) -> str:
    with pytest.raises(ValidationError) as info:
        ForgeSpec(model_type="llama", architecture="LlamaForCausalLM", **{"config": TINY, **changes})
    (err,) = info.value.errors()
    return ".".join(map(str, err["loc"] + err.get("ctx", {}).get("at", ()))) + ": " + err["msg"]


@pytest.mark.parametrize("config, where", [
    ({**TINY, "hidden_size": "1e9"}, "config.hidden_size: must be a whole number in 1..65536"),
    ({**TINY, "hidden_size": True}, "config.hidden_size: must be a whole number"),
    ({**TINY, "hidden_size": 64.0}, "config.hidden_size: must be a whole number"),
    ({**TINY, "num_hidden_layers": -1}, "config.num_hidden_layers: must be a whole number in 1..1024"),
    ({**TINY, "num_hidden_layers": None}, "config.num_hidden_layers: must be a whole number"),
    ({k: v for k, v in TINY.items() if k != "hidden_size"}, "config: set hidden_size"),
    ({**TINY, "num_experts_per_tok": 2}, "config: set the expert count"),
    ({**TINY, "n_group": 10**9}, "config.n_group: must be in 0..1048576"),
    ({**TINY, "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 64},
     "config.hidden_size: the forged model would have about"),
    ({**TINY, "num_local_experts": 4096, "intermediate_size": 4096}, "config.intermediate_size: the forged model"),
])
def test_a_config_that_could_not_be_forged_in_a_few_gb_is_refused_at_its_field(config, where):
    assert where in _refused(config=config)
    if "the forged model" in where:  # the estimate and the limit are both in the message
        assert f"limit of {MAX_FORGE_PARAMS:,}" in _refused(config=config)


def test_expert_fields_stated_as_null_are_a_dense_model_not_a_moe_left_at_its_full_size_default():
    # Gemma 4's dense sizes state num_experts / moe_intermediate_size as null (enable_moe_block false)
    spec = ForgeSpec(model_type="llama", architecture="LlamaForCausalLM",
                     config={**TINY, "num_experts": None, "moe_intermediate_size": None})
    assert spec.config["num_experts"] is None
    assert "config: set the expert count" in _refused(config={**TINY, "num_experts": None, "num_experts_per_tok": 2})


def test_a_per_layer_field_of_a_heterogeneous_config_reads_as_its_global_value_and_nothing_is_saved():
    from transformers import AutoConfig

    # transformers' Gemma 4 config: full-attention layers take global_head_dim, kept as per_layer_config
    config = AutoConfig.for_model("gemma4_text", num_hidden_layers=2, head_dim=64, global_head_dim=128,
                                  layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        config.head_dim  # noqa: B018 - transformers refuses the plain read
    assert read_field(config, "head_dim") == 64 and read_field(config, "no_such_field", "none") == "none"
    assert read_field(config, "per_layer_config") == {"1": {"head_dim": 128}}
    assert "allow_global_per_layer_attribute_access" not in config.to_dict()  # the opt-in is not saved
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        config.head_dim  # noqa: B018 - and holds for this read only


def test_extra_tensors_config_json_and_components_count_too():
    assert "extra_tensors.0.shape: the forged model" in _refused(
        extra_tensors=[{"name": "model.layers.{layer}.big", "shape": [1 << 14, 1 << 14]}])
    assert "config_json.num_hidden_layers: must be a whole number" in _refused(config_json={"num_hidden_layers": 0})
    # vLLM builds what config.json says: a size config_json raises counts, and is named there
    assert "config_json.hidden_size: the forged model" in _refused(config_json={"hidden_size": 16384,
                                                                               "num_hidden_layers": 64})
    assert "components.0.config.hidden_size: must be" in _refused(
        components=[{**COMPOSITE["components"][0], "config": {**TINY, "hidden_size": 0}}])
    assert MAX_FORGE_PARAMS * 4 <= 4 * 10**9  # the cap is a few GB of float32, as its comment says


def test_resolve_without_building_names_the_forged_path_and_writes_nothing(tmp_path, monkeypatch):
    from servematrix.checkpoint.resolve import resolve
    from servematrix.config.scenario import ScenarioStore

    cache = tmp_path / "cache"
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(cache))
    store = ScenarioStore(REPO / "scenarios")
    scenario = store.get("tiny-llama")
    path = resolve(scenario, store.directory, build=False)
    assert path.startswith(str(cache / "forged" / f"tiny-llama-{scenario.model.forge.key()}-"))
    assert not cache.exists()
    converted = resolve(store.get("smollm2-135m"), store.directory, build=False)
    assert converted.startswith(str(cache / "converted" / "smollm2-135m-")) and not cache.exists()


def test_a_missing_model_path_is_a_config_error_at_model_path(write):
    from servematrix.errors import ConfigError
    from servematrix.checkpoint.resolve import ModelUnavailable, resolve
    from servematrix.config.scenario import ScenarioStore

    from tests.unit.config.test_matrix import SCENARIO

    path = write("scenarios/alpha.yaml", SCENARIO.format(name="alpha").replace("/nonexistent", "../no-such-model"))
    store = ScenarioStore(path.parent)
    for build in (False, True):
        with pytest.raises(ConfigError) as info:
            resolve(store.get("alpha"), store.directory, build=build)
        assert (info.value.path, info.value.line, info.value.field) == (str(path), 4, "model.path")
        assert "no-such-model does not exist" in info.value.message
        assert isinstance(info.value, ModelUnavailable)  # a run records it as the entry's failure


def test_an_encoder_is_written_by_the_class_its_architecture_names_with_an_int64_index_buffer(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    bert = ForgeSpec(model_type="bert", architecture="BertModel",
                     config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "max_position_embeddings": 64},
                     tokenizer={"vocab_size": 300, "chat_template": False},
                     extra_tensors=[{"name": "embeddings.position_ids", "shape": [1, 64], "arange": True,
                                     "dtype": "int64"}])
    out = forge("bert-encoder", bert)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        positions = f.get_tensor("embeddings.position_ids")
    assert "encoder.layer.0.attention.self.query.weight" in names and "pooler.dense.weight" in names
    assert not any(n.startswith(("bert.", "cls.")) for n in names)  # not BertLMHeadModel's layout
    assert str(positions.dtype) == "torch.int64" and positions.tolist() == [list(range(64))]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]


def test_an_int64_extra_must_be_an_index_buffer():
    with pytest.raises(ValidationError, match="arange"):
        ExtraTensor(name="x", shape=[4], dtype="int64")
    with pytest.raises(ValidationError, match="arange"):
        ExtraTensor(name="x", shape=[4], arange=True, random=True)


def test_extras_without_arange_keep_the_cache_key_they_had_before_the_field_existed():
    import hashlib

    from servematrix.config.forge_spec import FORGE_VERSION

    s = spec(extra_tensors=[ExtraTensor(name="model.layers.{layer}.self_attn.k_proj.k_scale", value=0.5)])
    dump = s.model_dump()
    dump.pop("quantize")
    dump.pop("text_config_key")  # nor the nested composites' text_config_key
    for extra in dump["extra_tensors"]:
        extra.pop("arange")
    old = hashlib.sha256(json.dumps({"v": FORGE_VERSION, **dump}, sort_keys=True).encode()).hexdigest()[:16]
    assert s.key() == old
    assert spec(extra_tensors=[ExtraTensor(name="p", shape=[1, 4], arange=True, dtype="int64")]).key() != old


def test_the_forged_path_changes_with_the_code_that_writes_it(tmp_path, monkeypatch):
    """The forge cache is shared by every clone on a machine (CI's test cache): a checkpoint
    written by other forge code, or under other library versions, must not be reused."""
    from servematrix import paths
    from servematrix.checkpoint import forge

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    s = spec()
    before = forge.checkpoint_dir("t", s)
    assert forge.checkpoint_dir("t", s) == before  # stable for the same spec and code
    paths.code_digest.cache_clear()
    real = paths.Path.read_bytes

    def edited(self):
        data = real(self)
        return data + b"# edited" if self.name == "forge_tensors.py" else data

    monkeypatch.setattr(paths.Path, "read_bytes", edited)
    try:
        assert forge.checkpoint_dir("t", s) != before
    finally:
        paths.code_digest.cache_clear()


def test_an_expert_count_of_zero_is_given_a_dense_model_of_a_moe_family():
    """granite-4.0-h-1b's published config is dense with `num_local_experts: 0` beside MoE fields:
    0 is a count the config gives, not one it leaves to the (full-size) family default."""
    spec = ForgeSpec(model_type="llama", architecture="LlamaForCausalLM",
                     config={**TINY, "num_local_experts": 0, "num_experts_per_tok": 0})
    assert spec.config["num_local_experts"] == 0


def test_a_nested_composite_holds_its_text_config_under_its_key_with_the_causal_lm_class_and_random_tower_norms():
    """Llava's shape: the text model's config under text_config naming LlamaForCausalLM (vLLM builds the
    language model from it), the tower's under vision_config as save_pretrained writes one (its non-default
    fields), read back by transformers' own LlavaConfig; the tower's norms and biases drawn, not the class's
    ones and zeros (a load check could not tell those read)."""
    import torch

    s = ForgeSpec(model_type="llava", architecture="LlavaForConditionalGeneration", config=TINY,
                  tokenizer={"vocab_size": 300, "chat_template": False}, text_model_type="llama",
                  text_prefix="language_model.", text_config_key="text_config",
                  components=[{"model_type": "clip_vision_model", "prefix": "vision_tower.vision_model.",
                               "config_key": "vision_config",
                               "config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                          "num_hidden_layers": 1, "image_size": 28, "patch_size": 14}}],
                  config_json={"image_token_index": 299, "vision_feature_layer": -1})
    out = forge("unit-llava-nested", s)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert config["text_config"]["hidden_size"] == TINY["hidden_size"] and "hidden_size" not in config
    assert config["vision_config"]["model_type"] == "clip_vision_model" and "id2label" not in config["vision_config"]
    assert config["image_token_index"] == 299
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        norm = f.get_tensor("vision_tower.vision_model.pre_layrnorm.weight")
        bias = f.get_tensor("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias")
    assert "language_model.model.embed_tokens.weight" in names
    assert not torch.all(norm == 1) and not torch.all(bias == 0)
    assert s.key() != spec().key()
