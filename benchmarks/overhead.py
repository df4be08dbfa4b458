"""Run overhead: wall time of `servematrix run` on a one-scenario matrix over the raw time of
doing the same by hand — start the same vLLM server (same argv and env) until /health answers,
run the same lm_eval command (the NLL task included where the scenario measures gsm8k.nll), stop
the server — measured in one run, alternating the two.

    python benchmarks/overhead.py [--limit N] [--repeat R] [--matrix M --entry ID]   (goal: ratio <= 1.05)

The default is the CPU matrix's tiny Llama; on a GPU host: --matrix matrix/gpu-h200.yaml
--entry tiny-llama/tp1-pp1-fp32-gpu.

Both sides use the same forged checkpoint, built beforehand (forging is cached, so it is outside
both timings). servematrix additionally sends its smoke prompts and writes its reports: that is
the overhead being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import REPO

from servematrix.check import gsm8k  # noqa: E402 - after _common puts the repo on sys.path
from servematrix.serve.process import free_port  # noqa: E402
from servematrix.serve.server import build_spec  # noqa: E402

MATRIX = "matrix/cpu-smoke.yaml"
ENTRY = "tiny-llama/tp1-pp1-fp32"


def raw(limit: int, tmp: Path, matrix_path: str = MATRIX, entry_id: str = ENTRY) -> float:
    entry, scenario, model_path = _common.target(matrix_path, entry_id)
    spec = build_spec(entry, scenario, model_path, free_port(), tmp / "server.log")
    gsm8k.write_task(tmp, scenario.gsm8k.num_fewshot)
    # exactly the command servematrix runs: with the gold answers' log-likelihood task when the
    # scenario measures gsm8k.nll (it needs the checkpoint's tokenizer)
    argv = gsm8k.command(spec.base_url, scenario.model_name, scenario.gsm8k, limit, tmp,
                         tokenizer=model_path if scenario.gsm8k.nll else None)
    t0 = time.monotonic()
    with open(tmp / "server.log", "wb") as log:
        server = _common.start(spec.argv, spec.env, log)
    try:
        _common.wait_up(spec.base_url, server, tmp / "server.log")  # a /health probe every 0.5 s, like curl
        subprocess.run(argv, env={**os.environ, **gsm8k.OFFLINE_ENV}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:  # a script stops its server too: counted on both sides
        _common.stop(server)
    return time.monotonic() - t0


def managed(limit: int, tmp: Path, matrix_path: str = MATRIX, entry_id: str = ENTRY) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "servematrix.cli", "run", matrix_path, "-k", entry_id,
                    "--limit", str(limit), "--out", str(tmp / "run")], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    _common.add_target_args(ap, MATRIX, ENTRY)
    args = ap.parse_args()
    _common.target(args.matrix, args.entry)  # refuses an unknown --entry; forges once, outside the timings
    raws, runs = [], []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            raws.append(raw(args.limit, Path(tmp), args.matrix, args.entry))
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(managed(args.limit, Path(tmp), args.matrix, args.entry))
        print(f"round {i + 1}: by hand {raws[-1]:.1f} s, servematrix run {runs[-1]:.1f} s", flush=True)
    ratio = statistics.median(runs) / statistics.median(raws)
    print(json.dumps({"raw_s": raws, "servematrix_s": runs, "ratio": round(ratio, 3), "goal": 1.05,
                      "limit": args.limit, "entry": args.entry}))


if __name__ == "__main__":
    main()
