"""Whether each rank of a sweep's load check holds its own q, k and v rows of a fused qkv_proj, bit for bit:
for every cell directory given, the twin the cell loaded (its server.log's --model), each rank's recorded
digests of layer 0's qkv_proj parameters (loadcheck/rank<N>.json), and the same digest
(serve/loadcheck_worker._digest) of the twin's tensor cut as vLLM's QKVParallelLinear cuts it: q's rows of the
rank, then the rank's KV heads' k rows and v rows (one KV head replicated a rank where there are fewer than
ranks), scaled to the leaf's output dim (FP8 weight_scale_inv: block rows; AWQ qweight/qzeros: packs of 8).

    python benchmarks/qkv_sections_check.py RUN_DIR/phi3 tp1-fp8-block,tp2-fp8-block,tp2-awq,tp2-gptq
"""

import glob
import json
import sys

import torch
from safetensors.torch import load_file

from servematrix.serve.loadcheck_worker import _digest


def check(cell_dir: str) -> list[str]:
    model = open(f"{cell_dir}/server.log").readline().split("--model ")[1].split()[0]
    tensors = {}
    for f in glob.glob(model + "/*.safetensors"):
        tensors |= load_file(f)
    cfg = json.load(open(model + "/config.json"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    ranks = sorted(glob.glob(f"{cell_dir}/loadcheck/rank*.json"))
    tp, out = len(ranks), []
    q_rows, kv_rows = heads * hd, kv * hd
    for path in ranks:
        rank_file = json.load(open(path))
        rank = rank_file["rank"]
        kv_rank = kv // tp if kv % tp == 0 else 1  # KV heads a rank holds
        kv_index = rank if kv >= tp else rank // (tp // kv)
        rows = [(rank * q_rows // tp, q_rows // tp), (q_rows + kv_index * kv_rank * hd, kv_rank * hd),
                (q_rows + kv_rows + kv_index * kv_rank * hd, kv_rank * hd)]
        for name, want in rank_file["digests"].items():
            if not name.startswith("model.layers.0.") or ".qkv_proj." not in name:
                continue
            twin = tensors[name]
            dim = 0 if name.rsplit(".", 1)[1].startswith("weight") else 1  # the leaf's output dim
            ratio = (q_rows + 2 * kv_rows) // twin.shape[dim]
            cut = torch.cat([twin.narrow(dim, o // ratio, s // ratio) for o, s in rows], dim)
            out.append(f"{cell_dir} rank {rank} {name}: {'holds the rank' + chr(39) + 's q/k/v rows' if want == _digest(cut) else 'DIFFERS'}")
    return out


if __name__ == "__main__":
    run, cells = sys.argv[1], sys.argv[2].split(",")
    for cell in cells:
        print("\n".join(check(f"{run}/{cell}")))
