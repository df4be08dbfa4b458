"""Hardware: whether an entry fits the GPUs a host has (servematrix/gpus.py probes them).
Conditions are data: a scenario or quantization says what it needs (`requires:`), the entry's TP×PP says how many GPUs."""

from __future__ import annotations

import math

from servematrix.config.scenario import Requires
from servematrix.gpus import Gpu, probe_gpus


def host_gpus(ids: list[int] | None) -> list[Gpu]:
    """The GPUs this host may hand out: the probed ones, or those --gpus names. A named GPU that
    cannot be probed (no nvidia-smi) is taken on trust: its kind is unknown, so it meets every
    requirement."""
    probed = probe_gpus()
    if ids is None:
        return probed
    known = {g.index: g for g in probed}
    return [known.get(i) or Gpu(index=i, name=f"GPU {i} (not probed)", memory_gb=float("inf"),
                                capability=float("inf")) for i in ids]


def qualifying(requires: Requires, gpus: list[Gpu]) -> list[Gpu]:
    """The GPUs that meet `requires` (compute capability, memory)."""
    return [g for g in gpus
            if (requires.gpu_capability is None or g.capability >= requires.gpu_capability)
            and (requires.gpu_memory_gb is None or g.memory_gb >= requires.gpu_memory_gb)]


def unmet(need_gpus: int, requires: Requires, gpus: list[Gpu]) -> str | None:
    """Why an entry cannot run on these GPUs, or None when it fits."""
    if need_gpus == 0:
        return None
    fit = qualifying(requires, gpus)
    if len(fit) >= need_gpus:
        return None
    what = [f"{need_gpus} GPU{'s' if need_gpus > 1 else ''}"]
    if requires.gpu_capability is not None:
        what.append(f"compute capability >= {requires.gpu_capability}")
    if requires.gpu_memory_gb is not None:
        what.append(f">= {requires.gpu_memory_gb:g} GB each")
    have = ", ".join(g.name if math.isinf(g.capability) else f"{g.name} (sm {g.capability}, {g.memory_gb:g} GB)"
                     for g in gpus) or "no GPU"
    return f"needs {', '.join(what)}; this host has {len(fit)} that qualify of: {have}"
