"""The GPUs this host has, as nvidia-smi reports them. A base module (no stage imported): the
release catalog (config/releases.py) asks it which kind of host this is to pick a wheel, and the
serve stage (serve/hardware.py) asks it which GPUs an entry may have; neither imports the other."""

from __future__ import annotations

import os
import shutil
import subprocess

from pydantic import BaseModel


class Gpu(BaseModel):
    index: int
    name: str
    memory_gb: float
    capability: float  # CUDA compute capability, e.g. 9.0 for Hopper


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,name,memory.total,compute_cap --format=csv,noheader,nounits`"""
    gpus = []
    for line in text.strip().splitlines():
        index, name, mem, cap = (f.strip() for f in line.split(","))
        gpus.append(Gpu(index=int(index), name=name, memory_gb=round(float(mem) / 1024, 1), capability=float(cap)))
    return gpus


def probe_gpus() -> list[Gpu]:
    """This host's GPUs, limited to CUDA_VISIBLE_DEVICES when set; [] without an NVIDIA driver."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = parse_nvidia_smi(out.stdout)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        keep = {int(i) for i in visible.split(",") if i.strip().isdigit()}
        gpus = [g for g in gpus if g.index in keep]
    return gpus
