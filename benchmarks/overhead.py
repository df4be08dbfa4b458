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

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from servematrix.check import gsm8k  # noqa: E402
from servematrix.serve.process import free_port  # noqa: E402
from servematrix.serve.server import build_spec  # noqa: E402
from servematrix.config.matrix import load_matrix  # noqa: E402
from servematrix.checkpoint.resolve import resolve  # noqa: E402

MATRIX = "matrix/cpu-smoke.yaml"
ENTRY = "tiny-llama/tp1-pp1-fp32"


def raw(limit: int, tmp: Path, matrix_path: str = MATRIX, entry_id: str = ENTRY) -> float:
    matrix = load_matrix(REPO / matrix_path)
    entry = next(e for e in matrix.entries if e.id == entry_id)
    scenario = matrix.scenario(entry.scenario)
    spec = build_spec(entry, scenario, resolve(scenario), free_port(), tmp / "server.log")
    gsm8k.write_task(tmp, scenario.gsm8k.num_fewshot)
    model_path = resolve(scenario)
    # exactly the command servematrix runs: with the gold answers' log-likelihood task when the
    # scenario measures gsm8k.nll (it needs the checkpoint's tokenizer)
    argv = gsm8k.command(spec.base_url, scenario.model_name, scenario.gsm8k, limit, tmp,
                         tokenizer=model_path if scenario.gsm8k.nll else None)
    t0 = time.monotonic()
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        while True:  # what a person's script does: curl /health every half second
            try:
                if httpx.get(f"{spec.base_url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server died, see {tmp / 'server.log'}")
            time.sleep(0.5)
        subprocess.run(argv, env={**os.environ, **gsm8k.OFFLINE_ENV}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:  # a script stops its server too: counted on both sides
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
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
    ap.add_argument("--matrix", default=MATRIX, help="matrix file, relative to the repository")
    ap.add_argument("--entry", default=ENTRY, help="the entry id both sides run")
    args = ap.parse_args()
    matrix = load_matrix(REPO / args.matrix)
    entry = next((e for e in matrix.entries if e.id == args.entry), None)
    if entry is None:
        raise SystemExit(f"--entry: no entry {args.entry!r} in {args.matrix}")
    resolve(matrix.scenario(entry.scenario))  # forge once, outside the timings
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
