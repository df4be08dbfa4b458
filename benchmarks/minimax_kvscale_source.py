"""Write a metadata-only MiniMax-M2.5-style checkpoint with KV-cache scales: the source
`servematrix mirror` mirrors for #37214 (no real MiniMax-M2.5 header is reachable here).

Full size: the tensor names, dtypes and shapes transformers' MiniMaxM2ForCausalLM writes for its
configuration defaults (62 layers, 256 experts, 48 heads / 8 KV heads of 128; built on the meta
device by the mirror's own model_type reader), stored BF16 as the real checkpoints are, plus what
the quantized MiniMax-M2.5 checkpoints carry beyond that: F32 scalars
model.layers.N.self_attn.k_proj.k_scale / v_proj.v_scale, a quantization_config that gives
attention a KV-cache method (fp8, every attention projection and the experts ignored: this CPU has
no FP8 GEMM, as in ../shared/notes/seed-bugs.md), and the real config.json's fields vLLM reads
(rotary_dim 64, scoring_func sigmoid, use_routing_bias) and auto_map (the checkpoint ships its
configuration module; 0.18.1's transformers 4.57 needs it). Safetensors files are cut right after
their headers (8-byte length + JSON, no data), so the directory is a few MB.

    .venv/bin/python benchmarks/minimax_kvscale_source.py DIR
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

BYTES = {"BF16": 2, "F32": 4}


def header_only(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def main(out: Path) -> None:
    from servematrix.mirror.source import read_source

    layout = read_source("model_type:minimax_m2")  # the class's defaults + mirror-families.yaml's fields
    n = layout.config["num_hidden_layers"]
    tensors = {name: ("BF16" if m.dtype == "F32" else m.dtype, m.shape) for name, m in layout.tensors.items()}
    for i in range(n):
        tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"] = ("F32", ())
        tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"] = ("F32", ())
    ignored = [f"model.layers.{i}.self_attn.{p}" for i in range(n) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    ignored += [f"model.layers.{i}.mlp.experts" for i in range(n)]  # vLLM's name for block_sparse_moe.experts
    config = {**{k: v for k, v in layout.config.items() if k not in ("dtype", "id2label", "label2id")},
              "torch_dtype": "bfloat16",
              "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                           "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "ignored_layers": ignored}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    names = sorted(tensors)
    shards = 8
    weight_map = {}
    for s in range(shards):
        part = {k: tensors[k] for k in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header_only(out / fname, part)
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print(f"{out}: {len(tensors):,} tensors in {shards} header-only shards")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
