"""Checkpoint sources for the mirror tests, written by hand or forged by servematrix itself; nothing
comes from a hub. Header-only safetensors (an 8-byte length, the JSON header, no data) stand in for
real checkpoints: dense Llama-family layers in each quantization scheme's on-disk layout (written
out here, not from the rules the code under test reads), full-size Qwen3-FP8, Qwen2.5-AWQ and
DeepSeek-V3-FP8 shapes, truncated copies of forged seeds, and the Hugging Face cache layout."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import yaml

from servematrix.checkpoint.forge import forge
from servematrix.config.forge_spec import ForgeSpec


REPO = Path(__file__).resolve().parents[3]
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "F8_E4M3": 1}


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


def seed(name: str) -> tuple[ForgeSpec, Path]:
    data = yaml.safe_load((REPO / "scenarios" / f"{name}.yaml").read_text())
    spec = ForgeSpec(**data["model"]["forge"])
    return spec, forge(name, spec)


def fp8_block_source(directory: Path) -> Path:
    # Qwen3-8B-FP8's shape: 36 layers, 32 heads / 8 KV heads of 128, block 128x128
    cfg = llama_like("qwen3", 36, 4096, 32, 8, 128, 12288, 151936, tie_word_embeddings=False, rope_theta=1000000,
                     quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                          "weight_block_size": [128, 128]})
    t = quantized(dense_layers(36, 4096, 32, 8, 128, 12288, qk_norm=True), "fp8_block", "BF16")
    return write_checkpoint(directory, cfg, add_embeddings(t, 151936, 4096, "BF16", False), shards=4)


def awq_source(directory: Path) -> Path:
    # Qwen2.5-1.5B-Instruct-AWQ's shape: 28 layers, 12 heads / 2 KV heads, tied embeddings, q/k/v biases
    cfg = llama_like("qwen2", 28, 1536, 12, 2, None, 8960, 151936, tie_word_embeddings=True, torch_dtype="float16",
                     quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                          "zero_point": True})
    t = quantized(dense_layers(28, 1536, 12, 2, 128, 8960, bias=True), "awq", "F16")
    return write_checkpoint(directory, cfg, add_embeddings(t, 151936, 1536, "F16", True), shards=2)


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


def hf_cache_layout(cache_root: Path, repo: str, checkpoint: Path) -> Path:
    """The layout huggingface_hub resolves offline: models--ORG--NAME/refs/main + snapshots/<rev>/."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache_root / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    truncate_to_headers(checkpoint, root / "snapshots" / rev)
    return root / "snapshots" / rev


def minimax_kvscale_source(directory: Path, shards: int = 4) -> Path:
    """A full-size MiniMax-M2.5-style checkpoint with KV-cache scales, header only: transformers'
    MiniMaxM2ForCausalLM layout for its defaults (62 layers, 256 experts, 8 KV heads) in BF16, plus
    F32 k_proj.k_scale / v_proj.v_scale per layer, an fp8 quantization_config that ignores every
    attention projection and the experts, and the real config.json's auto_map and router fields.
    benchmarks/minimax_kvscale_source.py writes the same source (8 shards) for the served run."""
    from servematrix.mirror.source import read_source

    layout = read_source("model_type:minimax_m2")  # the class's defaults + mirror-families.yaml's fields
    n = layout.config["num_hidden_layers"]
    tensors = {name: ("BF16" if m.dtype == "F32" else m.dtype, list(m.shape)) for name, m in layout.tensors.items()}
    for i in range(n):
        tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"] = ("F32", [])
        tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"] = ("F32", [])
    ignored = [f"model.layers.{i}.self_attn.{p}" for i in range(n) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    ignored += [f"model.layers.{i}.mlp.experts" for i in range(n)]  # vLLM's name for block_sparse_moe.experts
    config = {**{k: v for k, v in layout.config.items() if k not in ("dtype", "id2label", "label2id")},
              "torch_dtype": "bfloat16",
              # the checkpoint ships its configuration module: 0.18.1's transformers 4.57 needs it
              "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                           "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored}}
    return write_checkpoint(directory, config, {k: tensors[k] for k in sorted(tensors)}, shards=shards)


# published configs of the corpus (servematrix/data/configs/) that transformers itself refuses as
# published, with the field its refusal names (vLLM's get_config refuses them the same way,
# docs/sweep-triage.md): DBRX's int moe_normalize_expert_weights against transformers 5's strict float
REFUSED_BY_TRANSFORMERS = {"dbrx": "moe_normalize_expert_weights"}
