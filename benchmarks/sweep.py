"""Sweep speed: cells per minute through the persistent worker (one process per release that pays
vLLM's imports once and forks each check's ranks) against one process per check (`--isolated`:
serve.loadcheck.run, what `servematrix run` does for a load check), on the same cells, in one run.

The twins are built first and not timed (both sides use the same ones); each side runs the whole
`servematrix sweep` path (registry probe, classification, cells, reports), so the figures are the
command's, not the worker's alone. The persistent side runs first: vLLM's model-info cache
(~/.cache/vllm/modelinfos) is then warm for the isolated side, which favours the isolated side.

    python benchmarks/sweep.py [-k CELLS] [--layouts tp1,tp2,pp2,tp2pp2] [--quant none,fp8-block] [--out DIR]
                                                                                        (goal: >= 5x)
A quantized layout's twins (re-forged from the base twin) are built on the persistent side's first
use and then cached, so they are timed there once and not on the isolated side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.paths import cache_dir  # noqa: E402
from servematrix.sweep import cells, twins  # noqa: E402
from servematrix.sweep.runner import SweepOptions, run  # noqa: E402

DEFAULT_K = "llama/*,qwen3_moe/*,deepseek_v3/*,gemma2/*"


def side(name: str, base: Path, lays, quants: list[str], k: str, isolated: bool) -> dict:
    opts = SweepOptions(releases=["current"], layouts=lays, quants=quants, k=k, out=base / name, isolated=isolated,
                        timeout=600)
    t0 = time.monotonic()
    summary = run(opts)
    wall = time.monotonic() - t0
    checked = [r for r in summary.scenarios if r.verdict != "skipped"]
    per_cell = sorted(r.seconds for r in checked)
    return {"side": name, "cells": len(checked), "passed": sum(r.verdict == "pass" for r in checked),
            "wall_s": round(wall, 1), "cells_per_min": round(len(checked) / wall * 60, 2),
            "check_s_total": round(sum(per_cell), 1),
            "check_s_median": per_cell[len(per_cell) // 2] if per_cell else None,
            "check_s_max": per_cell[-1] if per_cell else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default=DEFAULT_K, help=f"cells to time (default {DEFAULT_K})")
    p.add_argument("--layouts", default=",".join(cells.LAYOUTS))
    p.add_argument("--quant", default="none", help="comma-separated quantizations (default none)")
    p.add_argument("--out", help="where the two run directories go (default: a temp dir)")
    args = p.parse_args()
    lays, quants = cells.layouts(args.layouts), cells.quants(args.quant)
    base = Path(args.out or tempfile.mkdtemp(prefix="sweep-bench-"))
    model_types = sorted({t.split("/")[0] for t in args.k.split(",")})
    t0 = time.monotonic()
    for mt in model_types:  # untimed: both sides load the same twins from here
        twins.build(mt, cache_dir() / "sweep-twins", max(lay.pp for lay in lays), sorted({lay.tp for lay in lays}))
    print(f"twins built in {time.monotonic() - t0:.1f} s (not timed)", file=sys.stderr)
    persistent = side("persistent", base, lays, quants, args.k, isolated=False)
    isolated = side("isolated", base, lays, quants, args.k, isolated=True)
    speedup = persistent["cells_per_min"] / isolated["cells_per_min"] if isolated["cells_per_min"] else None
    result = {"persistent": persistent, "isolated": isolated, "speedup": speedup and round(speedup, 2),
              "goal": ">= 5x", "quants": quants, "out": str(base)}
    print(json.dumps(result, indent=2))
    (base / "benchmark.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
