"""How long `servematrix mirror` takes to read and plan a checkpoint of 100 000 tensors.

    python benchmarks/mirror_headers.py [--tensors 100000] [--shards 163] [--repeat 3]

The source is synthesized as DeepSeek-V3's FP8 release is laid out (transformers' deepseek_v3
class for the names and full-size shapes, F8_E4M3 weights with a 128x128-block weight_scale_inv
beside every projection, BF16 router/norms/embeddings, the MTP layer past the last decoder layer),
with decoder layers added until it holds at least --tensors tensors, split over --shards
safetensors files that stop right after their headers (no tensor data: metadata only, as the
mirror reads them). Timed: read_source (every header) + plan_twin (PP <= 4, TP 1/2/4/8); building
the synthetic source is not.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.mirror.plan import plan_twin  # noqa: E402
from servematrix.mirror.source import meta_layout, read_source  # noqa: E402

BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def deepseek_fp8_tensors(layers: int) -> tuple[dict, dict]:
    from transformers import AutoConfig

    config = AutoConfig.for_model("deepseek_v3", num_hidden_layers=layers).to_dict()
    config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                  quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                       "weight_block_size": [128, 128]})
    names = meta_layout("deepseek_v3", {"num_hidden_layers": layers}, "bfloat16")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name, meta in names.items():
        shape = list(meta.shape)
        if ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight")):
            tensors[name] = ("F8_E4M3", shape)
            tensors[name[: -len("weight")] + "weight_scale_inv"] = ("F32", [-(-shape[0] // 128), -(-shape[1] // 128)])
        else:
            tensors[name] = ("F32" if meta.dtype == "F32" else "BF16", shape)
    last = f"model.layers.{layers - 1}."
    for name, spec in list(tensors.items()):  # the MTP layer: a decoder layer plus its own modules
        if name.startswith(last):
            tensors[name.replace(last, f"model.layers.{layers}.")] = spec
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    for leaf, spec in {"enorm.weight": ("BF16", [hidden]), "hnorm.weight": ("BF16", [hidden]),
                       "eh_proj.weight": ("BF16", [hidden, 2 * hidden]), "shared_head.norm.weight": ("BF16", [hidden]),
                       "shared_head.head.weight": ("BF16", [vocab, hidden]),
                       "embed_tokens.weight": ("BF16", [vocab, hidden])}.items():
        tensors[f"model.layers.{layers}.{leaf}"] = spec
    return config, tensors


def write_header_only(directory: Path, config: dict, tensors: dict, shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[s * per:(s + 1) * per]:
            dtype, shape = tensors[name]
            size = math.prod(shape) * BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        (directory / fname).write_bytes(struct.pack("<Q", len(blob)) + blob)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=163)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    layers = 61
    while True:
        config, tensors = deepseek_fp8_tensors(layers)
        if len(tensors) >= args.tensors:
            break
        layers += 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "deepseek-v3-fp8-like"
        write_header_only(src, config, tensors, args.shards)
        header_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        read_s, plan_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            layout = read_source(str(src))
            t1 = time.perf_counter()
            plan = plan_twin(layout, max_pp=4, tp_values=[1, 2, 4, 8])
            t2 = time.perf_counter()
            read_s.append(t1 - t0)
            plan_s.append(t2 - t1)
    total = [r + p for r, p in zip(read_s, plan_s)]
    failed = [f"{i.name} ({i.detail})" for i in plan.invariants if not i.holds]
    print(f"source: {len(tensors):,} tensors ({layers} decoder layers + 1 MTP) in {args.shards} header-only shards "
          f"({header_bytes / 1e6:.1f} MB of headers)")
    print(f"twin: {len(plan.twin):,} tensors, {len(plan.kept_layers)} layers, invariants "
          f"{'all hold' if not failed else 'FAIL ' + '; '.join(failed)}")
    print(f"read (headers) + plan: {statistics.median(total):.2f} s median of {args.repeat} "
          f"(read {statistics.median(read_s):.2f} s, plan {statistics.median(plan_s):.2f} s; "
          f"runs {', '.join(f'{t:.2f}' for t in total)} s)")

if __name__ == "__main__":
    main()
