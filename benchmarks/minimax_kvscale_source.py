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
import sys
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from tests.unit.mirror.sources import minimax_kvscale_source  # the mirror tests read the same source


def main(out: Path) -> None:
    minimax_kvscale_source(out, shards=8)
    n = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"{out}: {n:,} tensors in 8 header-only shards")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
