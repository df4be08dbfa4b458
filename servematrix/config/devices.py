"""Device profiles (servematrix/data/devices.yaml): how a server runs on each kind of device
(environment, thread binding, whether it takes GPUs, what a load check builds with). Data, read in
this one place, by the scenario validator, the launcher and the session."""

from __future__ import annotations

import functools

from servematrix.config.yamlio import load_yaml
from servematrix.paths import data_file


@functools.lru_cache(maxsize=1)
def _profiles() -> dict[str, dict]:
    # the one loader (bounded, YAML 1.1 numbers refused), like every file servematrix reads
    return load_yaml(data_file("devices.yaml")).data


def device_names() -> tuple[str, ...]:
    """The devices an entry may name (the launcher needs a profile for every server it starts)."""
    return tuple(_profiles())


def device_profile(device: str) -> dict:
    profiles = _profiles()
    if device not in profiles:
        raise KeyError(f"unknown device {device!r} (known: {', '.join(profiles)})")
    return profiles[device]


def uses_gpus(device: str) -> bool:
    return bool(device_profile(device).get("uses_gpus"))
