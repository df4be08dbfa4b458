"""servematrix fix modules, loaded into every vLLM process through vLLM's own plugin system.

vLLM calls `register()` (entry point `vllm.general_plugins`) in the API server, the engine core
and every TP/PP worker. It does nothing unless SERVEMATRIX_FIXES names fixes, so installing
servematrix patches vLLM for nobody else. For each named fix, `detect()` reads vLLM's own code
to decide whether this vLLM has the bug; only then is the idempotent `apply()` run. Every process
appends what it did, one JSON line each, to SERVEMATRIX_FIX_REPORT; the runner gathers them into
the scenario's record.

Fix modules are registered lazily by "module:attr" (like lm-eval's registry), so a broken fix
cannot stop the others from loading.
"""

from __future__ import annotations

import importlib
import json
import os
import traceback

ENV_FIXES = "SERVEMATRIX_FIXES"
ENV_REPORT = "SERVEMATRIX_FIX_REPORT"

REGISTRY: dict[str, str] = {
    "cpu-moe-silu": "servematrix_fixes.cpu_moe_silu:FIX",
    "dsa-indexer-fp8-38870": "servematrix_fixes.dsa_indexer_fp8:FIX",
    "dsa-indexer-pp-42944": "servematrix_fixes.dsa_indexer_pp:FIX",
    "ernie45-moe-pp-tied": "servematrix_fixes.ernie45_moe_pp_tied:FIX",
    "granitemoehybrid-pp-50962": "servematrix_fixes.granitemoehybrid_pp:FIX",
    "inject-scale": "servematrix_fixes.inject_scale:FIX",
    "minicpmv-resampler-39862": "servematrix_fixes.minicpmv_resampler:FIX",
    "minimax-k-norm-38191": "servematrix_fixes.minimax_k_norm:FIX",
    "minimax-kv-scale-37214": "servematrix_fixes.minimax_kv_scale:FIX",
    "transformers-seqcls-score": "servematrix_fixes.transformers_seqcls_score:FIX",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def load(name: str):
    if name not in REGISTRY:
        close = [n for n in REGISTRY if n.split("-")[0] == name.split("-")[0]]
        hint = f" Did you mean {close[0]}?" if close else ""
        raise KeyError(f"unknown fix {name!r}.{hint} Available: {', '.join(names())}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _report(entry: dict) -> None:
    path = os.environ.get(ENV_REPORT)
    if not path:
        return
    line = json.dumps(entry) + "\n"
    with open(path, "a") as f:  # one short append per line: atomic enough between processes
        f.write(line)


def register() -> None:
    """vLLM's general-plugin hook."""
    wanted = [n.strip() for n in os.environ.get(ENV_FIXES, "").split(",") if n.strip()]
    for name in wanted:
        entry = {"name": name, "pid": os.getpid(), "status": "failed", "detail": None}
        try:
            fix = load(name)
            state, detail = fix.detect()
            if state == "bug":
                fix.apply()
                entry.update(status="applied", detail=detail)
            else:
                entry.update(status={"fixed": "already-fixed", "n/a": "not-applicable"}[state], detail=detail)
        except Exception as exc:  # noqa: BLE001 - a fix that cannot apply leaves vLLM untouched
            entry["detail"] = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2).splitlines()[-1]}"
        _report(entry)
