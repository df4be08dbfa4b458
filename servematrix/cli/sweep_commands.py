"""`servematrix sweep`: the model zoo of one or more vLLM releases × layouts × quantizations, each
cell a load check of a mirrored twin (servematrix/sweep/). Imports of the product stay inside the
function: `servematrix --help` must not load the package."""

from __future__ import annotations

from pathlib import Path

from servematrix.cli.args import finite_positive_float, non_negative_int, out_dir, positive_int


def add_sweep(sub) -> None:
    s = sub.add_parser("sweep", help="every architecture a release registers × layouts × quant, load-checked")
    s.add_argument("--vllm", action="append", metavar="REL",
                   help="release to sweep (repeatable; default: current, the vLLM beside servematrix)")
    s.add_argument("--layouts", default="tp1,tp2,pp2,tp2pp2", help="comma-separated: tp<T>, pp<P>, tp<T>pp<P>")
    s.add_argument("--quant", default="none",
                   help="comma-separated quantizations: none, fp8-block, fp8-kv, awq, gptq (servematrix/data/sweep-quants.yaml)")
    s.add_argument("-k", help="filter: substring or glob of the cell id, tag:NAME; comma = or")
    s.add_argument("--limit", type=positive_int, help="at most N checkable cells")
    s.add_argument("--out", type=out_dir, help="run directory (default reports/sweep-<timestamp>)")
    s.add_argument("--overwrite", action="store_true", help="--out may hold a run already")
    s.add_argument("--isolated", action="store_true",
                   help="one process per check instead of a persistent worker per release (slower)")
    s.add_argument("--timeout", type=finite_positive_float, default=300.0,
                   help="seconds per cell's load check, and per server start-up when served (default 300)")
    s.add_argument("--retries", type=non_negative_int, default=1,
                   help="extra attempts after an infrastructure failure (OOM, timeout), as `run --retries` (default 1)")
    s.add_argument("--depth", choices=("load", "serve"), default="load",
                   help="load (default): vLLM's construction + load_weights under the layout; serve: then, where "
                        "the CPU has the kernels (data/sweep-quants.yaml `serve:`), a real server and one completion")
    s.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="ray: each release's persistent worker is a Ray actor (results in the same run directory)")
    s.add_argument("--ray-address", help="--backend ray: the cluster to join (default: start a one-node cluster here)")
    s.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from datetime import datetime

    from servematrix.errors import ArgumentError
    from servematrix.redact import terminal
    from servematrix.run import rundir
    from servematrix.serve.envs import CURRENT, canonical
    from servematrix.sweep import cells
    from servematrix.sweep.runner import SweepOptions, run

    if args.backend == "ray" and args.isolated:
        raise ArgumentError("--isolated", "runs one process per check on this host; --backend ray runs the "
                                          "persistent workers as Ray actors: give one of them")
    if args.ray_address and args.backend != "ray":
        raise ArgumentError("--ray-address", "only with --backend ray")
    out = Path(args.out) if args.out else Path("reports") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    # --out first: resolving an undeclared --vllm caches its recipe, and a refused sweep writes nothing
    rundir.check(out, args.overwrite)
    # a bare version X.Y.Z becomes the release it resolves to (cpu-X.Y.Z, or cuda-X.Y.Z where no CPU wheel exists)
    releases = [canonical(v, "--vllm") for v in args.vllm or [CURRENT]]
    opts = SweepOptions(releases=list(dict.fromkeys(releases)), layouts=cells.layouts(args.layouts),
                        quants=cells.quants(args.quant), k=args.k, limit=args.limit, out=out,
                        overwrite=args.overwrite, isolated=args.isolated, timeout=args.timeout, retries=args.retries,
                        depth=args.depth, backend=args.backend, ray_address=args.ray_address)
    summary = run(opts)
    regressions = Path(summary.run_dir) / "regressions.json"
    if len(opts.releases) > 1 and regressions.is_file():  # the regression list, between each release and the next
        import json

        # cell ids and failure signatures (vLLM's own error text): shown escaped and bounded, never obeyed
        for p in json.loads(regressions.read_text()):
            print(f"{terminal(p['before'], 80)} -> {terminal(p['after'], 80)}: {terminal(p['compared'])} cells on both")
            for what in ("newly_failing", "newly_passing"):
                for line in p[what]:
                    print(f"  {what.replace('_', ' ')}: {terminal(line)}")
    print(f"{terminal(summary.run_dir, None)}: {', '.join(f'{k}: {v}' for k, v in summary.counts.items())} "
          f"-> exit {summary.exit_code}")
    return summary.exit_code or 0
