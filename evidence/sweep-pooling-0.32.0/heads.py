"""Per checked pooling cell of a sweep: the twin's head tensors and whether a rank of the load check holds them."""
import json, sys
from pathlib import Path
from servematrix.sweep import pooling
out, twins = Path(sys.argv[1]), Path(sys.argv[2])
rows = ["| cell | verdict | vLLM model (rank 0) | head tensors loaded (distinctive) | not found |", "|---|---|---|---|---|"]
for rec in json.loads((out / "summary.json").read_text())["scenarios"]:
    if rec["verdict"] == "skipped":
        continue
    check = out / rec["id"] / "loadcheck"
    ranks = [json.loads(p.read_text()) for p in sorted(check.glob("rank*.json"))]
    model = ranks[0].get("model") if ranks else None
    heads = pooling.head_loaded(twins / rec["scenario"], check) if rec["verdict"] == "pass" else []
    dist = [h for h in heads if h.distinctive]
    miss = [f"{h.name}" + ("" if h.distinctive else " (constant)") for h in heads if not h.loaded]
    shown = f"{sum(h.loaded for h in dist)}/{len(dist)}" + (f" (+{sum(h.loaded for h in heads if not h.distinctive)}/{len(heads)-len(dist)} constant)" if len(heads) > len(dist) else "") if heads else "no head (base model)"
    renamed = [f"{h.name}→{h.param}" for h in heads if h.loaded and h.param and not h.param.endswith(h.name)]
    rows.append(f"| {rec['id']} | {rec['verdict']} | {model or '–'} | {shown if rec['verdict']=='pass' else '–'}{'; renamed: ' + ', '.join(renamed) if renamed else ''} | {', '.join(miss) or '–'} |")
print("\n".join(rows))
