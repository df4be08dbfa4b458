"""GPU packing: the makespan servematrix's dispatch policy reaches on a host with k GPUs, over the
yardstick max(total GPU-seconds / k, longest scenario), replaying real per-scenario durations from
run reports (summary.json). Goal: ratio <= 1.1.

    python benchmarks/packing.py [RUN_DIR ...] [--gpus 2 4 8] [--estimates RUN_DIR]

Each record becomes a job of TP×PP GPUs lasting the seconds it really took (jobs are independent:
parity and agreement are computed from the records afterwards). The policy is the one LocalPool and
the simulation share (servematrix/dispatch.py), fed with estimates from --estimates (an earlier
run, as history.sqlite would give), or with no estimates at all (every job 120 s: order only by
differences in size). The replay uses dispatch.simulate, the same pick() a live run calls.
The shape bound is a second lower bound: jobs wider than half the GPUs cannot overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.run.dispatch import DEFAULT_ESTIMATE, Job, simulate  # noqa: E402

DEFAULT_RUNS = ["evidence/gpu-smoke-h200x2", "evidence/ray-full", "evidence/gate-A", "evidence/gate-B", "evidence/gate-C"]


def records(run_dirs: list[str]) -> list[tuple[str, dict]]:
    """(job id, record) for every judged scenario, ids prefixed by their run so runs can mix."""
    out = []
    for d in run_dirs:
        summary = json.loads((Path(d) / "summary.json").read_text())
        for r in summary["scenarios"]:
            if r["verdict"] != "skipped" and r["seconds"] > 0:
                out.append((f"{Path(d).name}:{r['id']}", r))
    return out


def jobs_from(recs: list[tuple[str, dict]], estimates: dict[str, float] | None) -> list[Job]:
    jobs = []
    for k, (jid, r) in enumerate(recs, 1):
        est = DEFAULT_ESTIMATE if estimates is None else estimates.get(r["id"], DEFAULT_ESTIMATE)
        jobs.append(Job(k=k, id=jid, gpus=r["tp"] * r["pp"], estimate=est))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=DEFAULT_RUNS)
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--estimates", help="run directory whose durations serve as the estimates")
    args = ap.parse_args()
    recs = records(args.runs)
    durations = {jid: r["seconds"] for jid, r in recs}
    estimates = None
    if args.estimates:
        estimates = {r["id"]: r["seconds"] for _, r in records([args.estimates])}
    print(f"{len(recs)} scenarios from {', '.join(args.runs)}; "
          f"{sum(durations.values()):.0f} s in all; GPUs per job: "
          f"{sorted({r['tp'] * r['pp'] for _, r in recs})}")
    print("| GPUs | estimates | makespan s | GPU-s / k | longest s | ratio | shape bound s | over shape bound |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for k in args.gpus:
        if max(r["tp"] * r["pp"] for _, r in recs) > k:
            continue
        for label, est in (("none", None), (args.estimates or "same run", estimates or {
                r["id"]: r["seconds"] for _, r in recs})):
            plan = simulate(jobs_from(recs, est), durations, k)
            worst = max(worst, plan.ratio)
            tight = max(plan.bound, plan.shape_bound)
            print(f"| {k} | {label} | {plan.makespan:.0f} | {plan.gpu_seconds / k:.0f} | {plan.longest:.0f} "
                  f"| {plan.ratio:.3f} | {plan.shape_bound:.0f} | {plan.makespan / tight:.3f} |")
    print(f"worst ratio {worst:.3f} (goal <= 1.1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
