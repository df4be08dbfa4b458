"""The sweep spread over a Ray cluster (`--backend ray`) against the local persistent worker, on the
same cells and the same cores: cells per minute with N simulated nodes (a ray.cluster_utils
cluster on this host, each node one servematrix_cpu_server slot), and the Ray path's cost per cell.

- cells/min: each side is the whole `servematrix sweep` path (registry probe, cells, reports);
  the local side is one persistent world, cells in order; a Ray side has one world per node, cells
  handed to free worlds. Simulated nodes share this host's cores, so this measures the spreading's
  cost and what concurrency buys on these cores, not a real cluster's speed-up.
- overhead per cell: a record's seconds (taken on the driver) less its load check's seconds (taken
  in the world, on the node): for Ray, the actor call, the twin's first fetch on a node, the
  results' tar.gz home and their unpacking; for the local side, the same bookkeeping without them.
- scheduler alone: sweep/spread.py over N scripted worlds whose cells do nothing (µs per cell).

The twins are built first and not timed (every side loads the same ones).

    python benchmarks/ray_sweep.py [-k CELLS] [--layouts tp1] [--nodes 1,2] [--out DIR]
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
from servematrix.run.dispatch import CPU_SERVER  # noqa: E402
from servematrix.sweep import cells, spread, twins  # noqa: E402
from servematrix.sweep.runner import SweepOptions, run  # noqa: E402

DEFAULT_K = "llama/tp1-none,qwen3/tp1-none,gpt2/tp1-none,opt/tp1-none,qwen2/tp1-none,qwen3_moe/tp1-none"


def side(name: str, opts: SweepOptions) -> dict:
    t0 = time.monotonic()
    summary = run(opts)
    wall = time.monotonic() - t0
    checked = [r for r in summary.scenarios if r.verdict != "skipped"]
    over = sorted(r.seconds - r.load_check.seconds for r in checked if r.load_check is not None)
    return {"side": name, "cells": len(checked), "passed": sum(r.verdict == "pass" for r in checked),
            "nodes": len({r.node for r in checked}), "wall_s": round(wall, 1),
            "cells_per_min": round(len(checked) / wall * 60, 2),
            "overhead_s_median": round(over[len(over) // 2], 3) if over else None,
            "overhead_s_max": round(over[-1], 3) if over else None}


def ray_side(n: int, base: Path, opts: SweepOptions) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {CPU_SERVER: 1},
                                                             "include_dashboard": False})
    try:
        for _ in range(n - 1):
            cluster.add_node(num_cpus=1, resources={CPU_SERVER: 1})
        return side(f"ray-{n}-nodes", opts.model_copy(update={"backend": "ray", "ray_address": cluster.address,
                                                                "out": base / f"ray-{n}"}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def scheduler_alone(worlds: int, n: int = 2000) -> dict:
    """spread.py's own cost: n cells that do nothing over `worlds` scripted worlds."""
    todo = [type("Cell", (), {"id": f"c{i}", "tp": 1, "pp": 1, "release": "current"})() for i in range(n)]
    done = []
    t0 = time.perf_counter()
    spread.spread(todo, [object() for _ in range(worlds)], lambda c, w, a: c, lambda c, r: done.append(r) or True,
                  lost=lambda c, w, why: None, interrupted=lambda c, w: None)
    seconds = time.perf_counter() - t0
    assert len(done) == n
    return {"worlds": worlds, "cells": n, "us_per_cell": round(seconds / n * 1e6, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default=DEFAULT_K, help=f"cells to time (default {DEFAULT_K})")
    p.add_argument("--layouts", default="tp1")
    p.add_argument("--nodes", default="1,2", help="simulated node counts for the Ray sides (default 1,2)")
    p.add_argument("--out", help="where the run directories go (default: a temp dir)")
    args = p.parse_args()
    lays = cells.layouts(args.layouts)
    base = Path(args.out or tempfile.mkdtemp(prefix="ray-sweep-bench-"))
    t0 = time.monotonic()
    for mt in sorted({t.split("/")[0] for t in args.k.split(",")}):  # untimed: every side loads these
        twins.build(mt, cache_dir() / "sweep-twins", max(lay.pp for lay in lays), sorted({lay.tp for lay in lays}))
    print(f"twins built in {time.monotonic() - t0:.1f} s (not timed)", file=sys.stderr)
    opts = SweepOptions(releases=["current"], layouts=lays, quants=["none"], k=args.k, out=base / "local", timeout=600)
    sides = [side("local", opts)]
    sides += [ray_side(int(n), base, opts) for n in args.nodes.split(",")]
    local = sides[0]["cells_per_min"]
    for s in sides[1:]:
        s["vs_local"] = round(s["cells_per_min"] / local, 2) if local else None
    result = {"sides": sides, "scheduler_alone": [scheduler_alone(w) for w in (1, 2, 8)], "out": str(base)}
    print(json.dumps(result, indent=2))
    (base / "benchmark.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
