"""Device profiles (servematrix/data/devices.yaml): how a server runs on each kind of device
(environment, thread binding, whether it takes GPUs, what a load check builds with). Data, read in
this one place (config/packaged.py: a damaged file stops at its line), by the scenario validator,
the launcher and the session."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from servematrix.config import packaged
from servematrix.config.fields import EnvName

DEVICES = "devices.yaml"
DeviceKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LoadCheckProfile(_Strict):
    # the attention backend a load check builds each kind of layer with where this device's
    # platform has no kernel for it (the names are vLLM's AttentionBackendEnum members)
    attention: dict[Literal["mla", "sparse"], Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$")]] = \
        Field(default_factory=dict)


class DeviceProfile(_Strict):
    env: dict[EnvName, str] = Field(default_factory=dict)  # set in every server's environment
    bind_threads: bool = False  # give each TP/PP rank its own cores (VLLM_CPU_OMP_THREADS_BIND)
    uses_gpus: bool = False  # the server takes TP×PP GPUs, handed out as CUDA_VISIBLE_DEVICES
    load_check: LoadCheckProfile | None = None

    def attention(self) -> dict[str, str]:
        """The attention backend a load check builds each kind of layer with here ({}: vLLM's own choice)."""
        return dict(self.load_check.attention) if self.load_check else {}


class DevicesFile(RootModel[dict[DeviceKey, DeviceProfile]]):
    model_config = ConfigDict(frozen=True)


def profiles() -> dict[str, DeviceProfile]:
    return packaged.load(DEVICES, DevicesFile).root


def device_names() -> tuple[str, ...]:
    """The devices an entry may name (the launcher needs a profile for every server it starts)."""
    return tuple(profiles())


def device(name: str) -> DeviceProfile:
    """The profile of device `name`; an unknown one is a KeyError naming the known ones (a scenario
    naming it was refused at its line before this is asked)."""
    known = profiles()
    if name not in known:
        raise KeyError(f"unknown device {name!r} (known: {', '.join(known)})")
    return known[name]


def uses_gpus(name: str) -> bool:
    return device(name).uses_gpus
