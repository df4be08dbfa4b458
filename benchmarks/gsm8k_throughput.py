"""gsm8k evaluation throughput over the same server's saturated throughput, measured in one run.

    python benchmarks/gsm8k_throughput.py --matrix matrix/gpu-h200.yaml \
        --entry smollm2-135m/tp1-pp1-bf16-gpu --limit 250 --concurrency 64   (goal: ratio >= 0.9)

One server (the entry's own command line, as servematrix builds it). First the lm_eval command
servematrix runs for gsm8k (generation task), at `--concurrency`; then a flood of exactly the
requests lm-eval sent (read back from its samples: same prompts, max_tokens, stop strings) at
`--flood` concurrent requests. Both sides are timed the same way, from the server's own
`vllm:generation_tokens_total` counter, sampled every 50 ms: generated tokens over the window in
which the counter moved. The ratio says whether lm-eval keeps the server as busy as a flood does;
the lm_eval command's whole wall time (imports, dataset, few-shot prompts) is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import _common
import httpx

from servematrix.check import gsm8k  # noqa: E402 - after _common puts the repo on sys.path
from servematrix.serve.process import free_port  # noqa: E402
from servematrix.serve.server import build_spec  # noqa: E402

COUNTER = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


class TokenMeter:
    """Samples the server's generated-token counter in a thread; `window()` is (tokens, seconds)
    between the first and the last sample at which the counter moved."""

    def __init__(self, base_url: str, period: float = 0.05):
        self.url, self.period = f"{base_url}/metrics", period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.is_set():
                try:
                    value = sum(float(v) for v in COUNTER.findall(client.get(self.url).text))
                    self.samples.append((time.monotonic(), value))
                except httpx.HTTPError:
                    pass
                self._stop.wait(self.period)

    def __enter__(self) -> "TokenMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # the server publishes its counters a little after the last response: wait until the
        # counter has been still for a second (at most 10 s) so the tail is not cut off
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recent = [v for t, v in self.samples if t > time.monotonic() - 1.0]
            if len(recent) >= 5 and min(recent) == max(recent):
                break
            time.sleep(self.period)
        self._stop.set()
        self._thread.join()

    def window(self) -> tuple[float, float]:
        moved = [i for i in range(1, len(self.samples)) if self.samples[i][1] > self.samples[i - 1][1]]
        if not moved:
            return 0.0, 0.0
        first, last = self.samples[moved[0] - 1], self.samples[moved[-1]]
        return last[1] - first[1], last[0] - first[0]


def requests_of(samples_file: Path) -> list[dict]:
    """The completion requests lm-eval sent, from its logged samples (arguments of each doc)."""
    out, seen = [], set()
    for line in samples_file.read_text().splitlines():
        doc = json.loads(line)
        if doc["doc_id"] in seen:  # one line per doc and filter
            continue
        seen.add(doc["doc_id"])
        args = next(iter(doc["arguments"].values()))
        prompt, kwargs = args["arg_0"], args["arg_1"]
        out.append({"prompt": prompt, "max_tokens": kwargs.get("max_gen_toks", 256),
                    "stop": kwargs.get("until"), "temperature": 0.0, "seed": 0})
    return out


async def flood(base_url: str, model: str, reqs: list[dict], concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body: dict) -> None:
            async with sem:
                r = await client.post(f"{base_url}/v1/completions", json={"model": model, **body})
                r.raise_for_status()
        await asyncio.gather(*(one(b) for b in reqs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_target_args(ap, "matrix/cpu-smoke.yaml", "smollm2-135m/tp1-pp1-fp32")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="lm-eval's num_concurrent")
    ap.add_argument("--flood", type=int, default=256, help="concurrent requests of the flood")
    args = ap.parse_args()
    entry, scenario, model_path = _common.target(args.matrix, args.entry)
    spec_g = scenario.gsm8k.model_copy(update={"num_concurrent": args.concurrency})
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        log = tmp / "server.log"
        spec = build_spec(entry, scenario, model_path, free_port(), log)
        gsm8k.write_task(tmp, spec_g.num_fewshot)
        argv = gsm8k.command(spec.base_url, scenario.model_name, spec_g, args.limit, tmp)
        with open(log, "wb") as f:
            server = _common.start(spec.argv, spec.env, f)
        try:
            _common.wait_up(spec.base_url, server, log)
            with TokenMeter(spec.base_url) as eval_meter:
                t0 = time.monotonic()
                subprocess.run(argv, env={**os.environ, **gsm8k.OFFLINE_ENV}, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                eval_wall = time.monotonic() - t0
            samples = sorted((tmp / "results").rglob(f"samples_{gsm8k.TASK}_*.jsonl"))
            reqs = requests_of(samples[-1])
            with TokenMeter(spec.base_url) as flood_meter:
                t0 = time.monotonic()
                asyncio.run(flood(spec.base_url, scenario.model_name, reqs, args.flood))
                flood_wall = time.monotonic() - t0
        finally:
            _common.stop(server)
    (et, es), (ft, fs) = eval_meter.window(), flood_meter.window()
    eval_rate, flood_rate = et / es if es else 0.0, ft / fs if fs else 0.0
    print(json.dumps({
        "entry": args.entry, "questions": len(reqs), "lm_eval_concurrency": args.concurrency,
        "flood_concurrency": args.flood,
        "eval": {"tokens": et, "busy_s": round(es, 2), "tok_per_s": round(eval_rate, 1),
                 "lm_eval_wall_s": round(eval_wall, 2)},
        "flood": {"tokens": ft, "busy_s": round(fs, 2), "tok_per_s": round(flood_rate, 1),
                  "wall_s": round(flood_wall, 2)},
        "ratio": round(eval_rate / flood_rate, 3) if flood_rate else None, "goal": 0.9,
    }))


if __name__ == "__main__":
    main()
