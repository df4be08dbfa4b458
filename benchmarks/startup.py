"""Cold and warm server start-up, split into phases, measured in one run.

    python benchmarks/startup.py --matrix matrix/gpu-h200.yaml --entry tiny-llama/tp1-pp1-fp32-gpu

Starts the entry's server twice *compiled* (its --enforce-eager removed) with one fresh
VLLM_CACHE_ROOT: the first start is cold (empty compile cache), the second warm (the cache the
first wrote). Each log line is time-stamped as it arrives; the phases are read from vLLM's own
lines:
  process start + imports  launch → the server's first log line
  to model load            first line → "Starting to load model"
  weights                  "Starting to load model" → "Model loading took"
  compile                  vLLM's "torch.compile takes X s in total" (0 when it says nothing)
  engine init rest         "Model loading took" → healthy, minus compile (profile run, KV cache,
                           CUDA graphs, API server start)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import _common

from servematrix.serve.process import free_port  # noqa: E402 - after _common puts the repo on sys.path
from servematrix.serve.server import build_spec  # noqa: E402

# vLLM 0.22.1 prints "torch.compile took X s in total" (evidence/gpu-h200-2/startup/cold.log); the first
# version of this pattern expected "takes" and read 0 there
COMPILE = re.compile(r"torch\.compile (?:takes|took) ([0-9.]+) s in total")
INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)")
MARKS = {"load_start": "Starting to load model", "load_done": "Model loading took"}


def start_once(argv: list[str], env: dict, base_url: str, log: Path) -> dict:
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = []
    proc = _common.start(argv, env, subprocess.PIPE)

    def pump() -> None:
        with open(log, "a") as f:
            for raw in proc.stdout:
                text = raw.decode(errors="replace")
                lines.append((time.monotonic() - t0, text))
                f.write(text)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        _common.wait_up(base_url, proc, log)
        healthy = time.monotonic() - t0
    finally:
        _common.stop(proc)
        reader.join(timeout=5)

    def at(text: str) -> float | None:
        return next((t for t, line in lines if text in line), None)
    first = lines[0][0] if lines else healthy
    load_start, load_done = at(MARKS["load_start"]), at(MARKS["load_done"])
    compile_s = sum(float(m.group(1)) for _, line in lines for m in [COMPILE.search(line)] if m)
    init = next((float(m.group(1)) for _, line in lines for m in [INIT.search(line)] if m), None)
    out = {"healthy_s": round(healthy, 2), "process_and_imports_s": round(first, 2), "compile_s": round(compile_s, 2),
           "vllm_init_engine_s": init}
    if load_start is not None and load_done is not None:
        out |= {"to_model_load_s": round(load_start - first, 2), "weights_s": round(load_done - load_start, 2),
                "engine_init_rest_s": round(healthy - load_done - compile_s, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_target_args(ap, "matrix/cpu-smoke.yaml", "tiny-llama/tp1-pp1-fp32")
    args = ap.parse_args()
    entry, scenario, model_path = _common.target(args.matrix, args.entry)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for kind in ("cold", "warm"):
            spec = build_spec(entry, scenario, model_path, free_port(), tmp / f"{kind}.log")
            argv = [a for a in spec.argv if a != "--enforce-eager"]
            env = {**os.environ, **spec.env, "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}
            results[kind] = start_once(argv, env, spec.base_url, tmp / f"{kind}.log")
            print(f"{kind}: {results[kind]}", flush=True)
    print(json.dumps({"entry": args.entry, **results}))


if __name__ == "__main__":
    main()
