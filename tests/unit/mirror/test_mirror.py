"""`servematrix mirror`: a checkpoint's metadata (config, tokenizer files, safetensors headers)
becomes a tiny forged twin with the source's tensor names, dtypes and quantization layout; the
twin's invariants hold; `diff` proves the names and dtypes equal up to the layer count.

Sources here are written by hand (header-only safetensors: an 8-byte length, the JSON header, no
data) or forged by servematrix itself; nothing comes from a hub."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from servematrix.errors import StateError, UserError
from servematrix.checkpoint.forge import forge
from servematrix.checkpoint.forge_spec import ForgeSpec
from servematrix.mirror.cli import cli_mirror, scenario_dict
from servematrix.mirror.diff import diff, infer_layer_map
from servematrix.mirror.twin import build_twin
from servematrix.mirror.dims import choose_kv, kv_class
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.layout import SourceLayout
from servematrix.mirror.source import read_header, read_local, read_source
from servematrix.config.scenario import ScenarioStore

REPO = Path(__file__).resolve().parents[3]
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "F8_E4M3": 1}


# ---- writing sources by hand ----

def header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file truncated right after its header: offsets as a real file's, no data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def write_checkpoint(directory: Path, config: dict, tensors: dict[str, tuple[str, list[int]]], shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    names = list(tensors)
    if shards == 1:
        header_only(directory / "model.safetensors", tensors)
        return directory
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header_only(directory / fname, part)
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def truncate_to_headers(src: Path, dst: Path) -> Path:
    """A metadata-only copy of a real checkpoint: every safetensors file cut right after its header."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[: 8 + n])
    return dst


def dense_layers(n_layers: int, hidden: int, heads: int, kv: int, hd: int, ffn: int, *, qk_norm=False, bias=False):
    """Llama-family (qwen2 / qwen3 / llama) tensors per layer: name -> (module kind, [out, in])."""
    out = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for m, shape in (("self_attn.q_proj", [heads * hd, hidden]), ("self_attn.k_proj", [kv * hd, hidden]),
                         ("self_attn.v_proj", [kv * hd, hidden]), ("self_attn.o_proj", [hidden, heads * hd]),
                         ("mlp.gate_proj", [ffn, hidden]), ("mlp.up_proj", [ffn, hidden]), ("mlp.down_proj", [hidden, ffn])):
            out[p + m] = ("linear", shape)
        for m in ("input_layernorm", "post_attention_layernorm"):
            out[p + m] = ("norm", [hidden])
        if qk_norm:
            out[p + "self_attn.q_norm"] = out[p + "self_attn.k_norm"] = ("norm", [hd])
        if bias:
            for m, n in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                out[p + f"self_attn.{m}.bias"] = ("bias", [n])
    return out


def quantized(modules: dict, scheme: str, float_dtype: str, group: int = 128) -> dict[str, tuple[str, list[int]]]:
    """Each linear in the scheme's on-disk layout, written out here by hand (not from the rules the
    code under test reads), everything else in `float_dtype`."""
    t: dict[str, tuple[str, list[int]]] = {}
    for name, (kind, shape) in modules.items():
        if kind in ("norm", "bias"):
            t[name if kind == "bias" else name + ".weight"] = (float_dtype, shape)
            continue
        n, k = shape
        if scheme == "none":
            t[name + ".weight"] = (float_dtype, [n, k])
        elif scheme == "fp8_block":
            t[name + ".weight"] = ("F8_E4M3", [n, k])
            t[name + ".weight_scale_inv"] = ("F32", [-(-n // 128), -(-k // 128)])
        elif scheme == "fp8_tensor":
            t[name + ".weight"] = ("F8_E4M3", [n, k])
            t[name + ".weight_scale"] = ("F32", [])
            t[name + ".input_scale"] = ("F32", [])
        elif scheme == "awq":
            t.update({name + ".qweight": ("I32", [k, n // 8]), name + ".qzeros": ("I32", [k // group, n // 8]),
                      name + ".scales": (float_dtype, [k // group, n])})
        elif scheme == "gptq":
            t.update({name + ".qweight": ("I32", [k // 8, n]), name + ".qzeros": ("I32", [k // group, n // 8]),
                      name + ".scales": (float_dtype, [k // group, n]), name + ".g_idx": ("I32", [k])})
        elif scheme == "nvfp4":
            if ".self_attn." in name:  # ModelOpt's NVFP4 MoE checkpoints keep attention in BF16
                t[name + ".weight"] = (float_dtype, [n, k])
                continue
            t.update({name + ".weight": ("U8", [n, k // 2]), name + ".weight_scale": ("F8_E4M3", [n, k // 16]),
                      name + ".weight_scale_2": ("F32", []), name + ".input_scale": ("F32", [])})
    return t


def llama_like(model_type: str, layers: int, hidden: int, heads: int, kv: int, hd: int | None, ffn: int,
               vocab: int, **extra) -> dict:
    cfg = {"architectures": [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "llama": "LlamaForCausalLM"}[model_type]], "model_type": model_type,
           "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
           "torch_dtype": "bfloat16", **extra}
    if hd:
        cfg["head_dim"] = hd
    return cfg


def add_embeddings(t: dict, vocab: int, hidden: int, dtype: str, tied: bool) -> dict:
    t["model.embed_tokens.weight"] = (dtype, [vocab, hidden])
    t["model.norm.weight"] = (dtype, [hidden])
    if not tied:
        t["lm_head.weight"] = (dtype, [vocab, hidden])
    return t


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the session's forge cache (conftest's), set here too: module fixtures run before its autouse one
    path = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVEMATRIX_CACHE", str(path))
        yield path


def seed(name: str) -> tuple[ForgeSpec, Path]:
    data = yaml.safe_load((REPO / "scenarios" / f"{name}.yaml").read_text())
    spec = ForgeSpec(**data["model"]["forge"])
    return spec, forge(name, spec)


# ---- header-only reading ----

def test_a_checkpoint_truncated_right_after_its_header_reads_and_mirrors_like_the_full_one(cache, tmp_path):
    _, full = seed("tiny-llama")
    meta = truncate_to_headers(full, tmp_path / "meta-only")
    (st,) = meta.glob("*.safetensors")
    assert st.stat().st_size < (full / "model.safetensors").stat().st_size / 100  # no tensor data at all
    a, b = read_local(full), read_local(meta)
    assert a.tensors == b.tensors and len(b.tensors) == 21
    assert b.tensors["model.layers.1.self_attn.k_proj.weight"].shape == (64, 128)
    plan = plan_twin(b, max_pp=2, tp_values=[1, 2])
    assert plan.ok, [i for i in plan.invariants if not i.holds]


def test_a_corrupt_header_length_is_a_state_error_naming_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b'{"x": 1}')
    with pytest.raises(StateError, match=r"model\.safetensors: corrupt safetensors header: its length field says "
                                         r"1000000000000 bytes") as exc:
        read_header(bad)
    assert isinstance(exc.value, UserError) and str(bad) in str(exc.value)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(StateError, match="shorter than the 8-byte header length"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 5) + b"nojs!")
    with pytest.raises(StateError, match="not JSON"):
        read_header(bad)
    header_only(bad, {"w": ("BF16", [4, 4])})
    data = json.loads(bad.read_bytes()[8:])
    data["w"]["data_offsets"] = [0, 7]  # 4x4 BF16 is 32 bytes
    blob = json.dumps(data).encode()
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(StateError, match=r"tensor 'w' BF16\[4, 4\] spans 7 bytes"):
        read_header(bad)


def test_mirroring_a_directory_with_a_corrupt_shard_is_one_user_error_line_not_a_traceback(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", llama_like("llama", 2, 128, 2, 1, 64, 256, 300),
                          add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False),
                          shards=2)
    shard = sorted(ck.glob("*.safetensors"))[1]
    shard.write_bytes(struct.pack("<Q", 2**40) + shard.read_bytes()[8:])
    with pytest.raises(UserError, match=rf"{shard.name}: corrupt safetensors header"):
        cli_mirror(str(ck), tmp_path / "twin.yaml", None, 2, [1, 2], "twin")
    assert not (tmp_path / "twin.yaml").exists()
    with pytest.raises(UserError, match="must be named twin.yaml"):
        cli_mirror(str(ck), tmp_path / "other.yaml", None, 2, [1, 2], "twin")


# ---- round trips through the forge ----

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


def test_the_dsa_seed_keeps_its_fp8_indexer_wk_with_block_scales_and_its_dense_first_layer(cache, tmp_path):
    _, seed_dir = seed("tiny-glm-5.1-dsa")
    plan = plan_twin(read_source(str(seed_dir)), max_pp=2, tp_values=[1, 2])
    assert plan.ok and plan.reproducible
    assert [b.tensors for b in plan.spec.fp8_blocks] == ["model.layers.*.self_attn.indexer.wk.weight"]
    assert plan.twin["model.layers.1.self_attn.indexer.wk.weight"].dtype == "F8_E4M3"
    assert plan.twin["model.layers.1.self_attn.indexer.wk.weight_scale_inv"].dtype == "F32"
    assert plan.spec.config["first_k_dense_replace"] == 1 and plan.spec.config["mlp_layer_types"] == ["dense", "sparse"]
    assert plan.layer_map == {0: 0, 1: 1, 2: 1, 3: 1}
    assert "model.layers.0.mlp.gate_proj.weight" in plan.twin and "model.layers.1.mlp.experts.3.up_proj.weight" in plan.twin


# ---- synthetic header-only quantized sources ----

def fp8_block_source(directory: Path) -> Path:
    # Qwen3-8B-FP8's shape: 36 layers, 32 heads / 8 KV heads of 128, block 128x128
    cfg = llama_like("qwen3", 36, 4096, 32, 8, 128, 12288, 151936, tie_word_embeddings=False, rope_theta=1000000,
                     quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                          "weight_block_size": [128, 128]})
    t = quantized(dense_layers(36, 4096, 32, 8, 128, 12288, qk_norm=True), "fp8_block", "BF16")
    return write_checkpoint(directory, cfg, add_embeddings(t, 151936, 4096, "BF16", False), shards=4)


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


def awq_source(directory: Path) -> Path:
    # Qwen2.5-1.5B-Instruct-AWQ's shape: 28 layers, 12 heads / 2 KV heads, tied embeddings, q/k/v biases
    cfg = llama_like("qwen2", 28, 1536, 12, 2, None, 8960, 151936, tie_word_embeddings=True, torch_dtype="float16",
                     quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                          "zero_point": True})
    t = quantized(dense_layers(28, 1536, 12, 2, 128, 8960, bias=True), "awq", "F16")
    return write_checkpoint(directory, cfg, add_embeddings(t, 151936, 1536, "F16", True), shards=2)


def test_a_header_only_awq_checkpoint_mirrors_its_int32_packs_by_post_processing_and_says_so(cache, tmp_path):
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
    assert "Post-processed after forging" in written.description and "awq layout" in written.description
    assert "needs post-processing" in text and list(written.quants) == ["awq"]


@pytest.mark.parametrize("scheme, qc, leaves", [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True},
     {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}),
    ("nvfp4", {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8",
               "exclude_modules": ["lm_head"] + [f"model.layers.{i}.self_attn*" for i in range(4)]},
     {"weight": "U8", "weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"}),
    ("fp8_tensor", {"quant_method": "fp8", "activation_scheme": "static"},
     {"weight": "F8_E4M3", "weight_scale": "F32", "input_scale": "F32"}),
])
def test_gptq_nvfp4_and_fp8_per_tensor_layouts_are_rewritten_to_the_source_leaves_and_dtypes(cache, tmp_path, scheme, qc, leaves):
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
    assert not plan.reproducible and {s.op for s in plan.post} >= {"quantize"}
    twin = read_local(build_twin(plan, f"{scheme}-twin", tmp_path / "twin"))
    for leaf, dtype in leaves.items():
        assert twin.tensors[f"model.layers.1.mlp.up_proj.{leaf}"].dtype == dtype, leaf
    report = diff(source, twin)
    assert report.equal, report.render()
    if scheme == "fp8_tensor":  # the forge writes BF16 norms: cast back; inv_freq: a forge extra in every layer
        assert {s.op for s in plan.post} == {"quantize", "cast"}
        assert twin.tensors["model.layers.1.input_layernorm.weight"].dtype == "F32"
        assert any(e.name == "model.layers.{layer}.self_attn.rotary_emb.inv_freq" for e in plan.spec.extra_tensors)
    if scheme == "nvfp4":
        assert twin.quant.config["exclude_modules"] == ["lm_head", "model.layers.0.self_attn*", "model.layers.1.self_attn*"]
        assert twin.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"
        assert twin.tensors["model.layers.1.self_attn.k_proj.k_scale"].shape == ()


def deepseek_fp8_source(directory: Path) -> Path:
    """A DeepSeek-V3-FP8-shaped checkpoint with its MTP layer (layer 5 of 5 main layers): FP8 blocks
    everywhere but the router, norms and embeddings; kv_a_proj_with_mqa ends in a partial block."""
    from servematrix.mirror.source import meta_layout

    cfg = {"hidden_size": 1024, "intermediate_size": 1024, "moe_intermediate_size": 512, "num_hidden_layers": 5,
           "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 16, "n_shared_experts": 1,
           "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 512,
           "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
           "num_nextn_predict_layers": 1, "vocab_size": 1000, "topk_method": "noaux_tc"}
    names = meta_layout("deepseek_v3", cfg, "bfloat16")
    t: dict[str, tuple[str, list[int]]] = {}
    for name, meta in names.items():
        shape = list(meta.shape)
        quant = ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight")) and len(shape) == 2
        if quant:
            t[name] = ("F8_E4M3", shape)
            t[name[: -len("weight")] + "weight_scale_inv"] = ("F32", [-(-shape[0] // 128), -(-shape[1] // 128)])
        else:
            t[name] = (meta.dtype, shape)
    for name, spec in list(t.items()):  # the MTP layer: a copy of the last decoder layer plus its own modules
        if name.startswith("model.layers.4."):
            t[name.replace("model.layers.4.", "model.layers.5.")] = spec
    for leaf, spec in {"enorm.weight": ("BF16", [1024]), "hnorm.weight": ("BF16", [1024]),
                       "eh_proj.weight": ("BF16", [1024, 2048]), "shared_head.norm.weight": ("BF16", [1024]),
                       "shared_head.head.weight": ("BF16", [1000, 1024]), "embed_tokens.weight": ("BF16", [1000, 1024])}.items():
        t["model.layers.5." + leaf] = spec
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **cfg,
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}}
    return write_checkpoint(directory, config, t, shards=3)


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


# ---- full-size layouts from transformers' defaults ----

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
    assert sum(math.prod(m.shape) for m in plan.twin.values()) < 50_000_000


# ---- the rules, and invariants that can fail ----

def test_the_kv_head_rule_splits_at_one_tp_and_replicates_at_another_else_follows_the_source():
    assert choose_kv(8, [1, 2, 4, 8], "cover") == 2
    assert [kv_class(2, t) for t in (2, 4, 8)] == ["split", "replicated", "replicated"]
    assert choose_kv(8, [1, 2, 4, 8], "faithful") == 8
    assert choose_kv(1, [1, 2, 4], "cover") == 1  # MQA stays MQA
    assert choose_kv(4, [1, 2], "cover") == 2  # one TP > 1 cannot do both: split, as the source at TP=2
    assert choose_kv(2, [1, 4], "cover") == 1  # the source replicates at TP=4: the smallest k that does too
    assert choose_kv(16, [1, 3, 6], "cover") == 3  # split at TP=3, replicated at TP=6; 2 would be invalid at TP=3


def test_a_twin_that_cannot_serve_the_asked_pp_is_refused_and_nothing_is_written(cache, tmp_path):
    _, seed_dir = seed("tiny-llama")
    plan = plan_twin(read_source(str(seed_dir)), max_pp=4, tp_values=[1, 2])
    assert not plan.ok and [i.name for i in plan.invariants if not i.holds] == ["layers"]
    with pytest.raises(UserError, match="layers"):
        cli_mirror(str(seed_dir), tmp_path / "twin.yaml", tmp_path / "twin", 4, [1, 2], "twin")
    assert not (tmp_path / "twin.yaml").exists() and not (tmp_path / "twin").exists()


def test_diff_reports_a_missing_tensor_and_a_changed_dtype_with_reasons(cache, tmp_path):
    _, seed_dir = seed("tiny-minimax-m2-kvscale")
    source = read_source(str(seed_dir))
    twin = source.tensors.copy()
    twin.pop("model.layers.1.self_attn.v_proj.v_scale")
    twin["model.layers.0.self_attn.v_proj.v_scale"] = twin.pop("model.layers.0.self_attn.v_proj.v_scale").model_copy(
        update={"dtype": "BF16"})
    broken = SourceLayout(**{**source.__dict__, "tensors": twin, "source": "broken"})
    report = diff(source, broken)
    assert not report.equal
    assert [i.name for i in report.only_in_source] == ["model.layers.1.self_attn.v_proj.v_scale"]
    assert report.only_in_source[0].reason.startswith("unexplained")
    assert [(d.name, d.source, d.twin) for d in report.dtypes] == [("model.layers.0.self_attn.v_proj.v_scale", ["F32"], ["BF16"])]


def test_without_mirror_json_diff_infers_the_layer_map_from_the_layer_kinds(cache, tmp_path):
    _, seed_dir = seed("tiny-glm-5.1-dsa")
    source = read_source(str(seed_dir))
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2])
    twin_dir = build_twin(plan, "dsa-twin", tmp_path / "twin")
    (twin_dir / "mirror.json").unlink()
    twin = read_local(twin_dir)
    assert twin.origin is None
    assert infer_layer_map(source, twin) == {0: 0, 1: 1, 2: 1, 3: 1}
    assert diff(source, twin).equal


# ---- Hugging Face ids, metadata only ----

def hf_cache_layout(cache_root: Path, repo: str, checkpoint: Path) -> Path:
    """The layout huggingface_hub resolves offline: models--ORG--NAME/refs/main + snapshots/<rev>/."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache_root / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    truncate_to_headers(checkpoint, root / "snapshots" / rev)
    return root / "snapshots" / rev


def test_a_hugging_face_id_resolves_offline_from_the_hf_cache_layout_reading_headers_only(cache, tmp_path, monkeypatch):
    _, seed_dir = seed("tiny-minimax-m2-kvscale")
    snapshot = hf_cache_layout(tmp_path / "hub", "forged/tiny-minimax-m2-kvscale", seed_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layout = read_source("forged/tiny-minimax-m2-kvscale")
    assert layout.kind == "hf" and layout.source == "hf:forged/tiny-minimax-m2-kvscale"
    assert layout.tensors == read_local(snapshot).tensors and layout.quant.kv_scales == 4
    assert "tokenizer.json" in layout.tokenizer.files and layout.tokenizer.chat_template
    assert plan_twin(layout, 2, [1, 2]).ok
    with pytest.raises(StateError, match="config.json is not in the local Hugging Face cache"):
        read_source("hf:forged/not-cached")


def test_online_the_tensor_layout_comes_from_the_hubs_safetensors_metadata_not_from_downloads(cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    _, seed_dir = seed("tiny-llama")
    fetched = []

    def fake_download(repo_id, filename, **kw):
        fetched.append(filename)
        if not (seed_dir / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(seed_dir / filename)

    def fake_metadata(self, repo_id, revision=None, **kw):
        tensors = {n: TensorInfo(dtype=m.dtype, shape=list(m.shape), data_offsets=(0, 0))
                   for n, m in read_header(seed_dir / "model.safetensors").items()}
        return SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map={n: "model.safetensors" for n in tensors},
                                       files_metadata={"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", fake_metadata)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    layout = read_source("hf:forged/tiny-llama")
    assert layout.tensors == read_local(seed_dir).tensors
    assert not any(f.endswith(".safetensors") for f in fetched)  # no weights downloaded


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
    assert [e.name for e in plan.spec.extra_tensors] == ["model.layers.{layer}.self_attn.k_proj.k_scale",
                                                         "model.layers.{layer}.self_attn.v_proj.v_scale"]
    assert plan.spec.config_json["quantization_config"]["ignored_layers"][-1] == "model.layers.1.mlp.experts"


def test_cli_diff_of_a_twin_and_its_source_reads_both_from_metadata_and_says_equal_or_not(cache, tmp_path):
    from servematrix.mirror.cli import cli_diff

    _, seed_dir = seed("tiny-llama")
    plan = plan_twin(read_source(str(seed_dir)), 2, [1, 2])
    twin_dir = build_twin(plan, "llama-twin", tmp_path / "twin")
    text, equal = cli_diff(str(seed_dir), str(twin_dir))
    assert equal and "names, dtypes and quantization_config equal" in text
    assert "config intermediate_size: 256 -> 128" in text  # not mirrored, with the reason
    text, equal = cli_diff(str(seed_dir), str(seed("tiny-minimax-m2")[1]))  # another family: a dense MLP it lacks
    assert not equal and "only in the source: model.layers.0.mlp.down_proj.weight" in text


def test_mirror_cli_writes_the_scenario_once_and_refuses_to_replace_it(tmp_path, capsys):
    from servematrix.cli import main

    out = tmp_path / "scenarios" / "twin-llama.yaml"
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "1,2,4", "--pp", "2"]) == 0
    written = out.read_bytes()
    assert b"model_type: llama" in written and "scenario: " in capsys.readouterr().out
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == written
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "0"]) == 2  # TP out of range


def test_model_type_source_carries_the_fields_real_checkpoints_have_that_vllm_reads():
    # vLLM builds DeepSeek-V3's router bias only for topk_method noaux_tc (every released V3-style
    # checkpoint); transformers' defaults lack the field, so without it the twin fails vLLM's loader
    from servematrix.mirror.source import read_model_type

    assert read_model_type("deepseek_v3").config["topk_method"] == "noaux_tc"
    assert "topk_method" not in read_model_type("llama").config
