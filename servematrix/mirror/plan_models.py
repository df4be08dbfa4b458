"""What a twin plan is: the Plan that plan_twin returns and its parts (the invariants checked,
what is not mirrored, the quantized targets, the post-processing steps).

Separate from plan.py, which computes a plan: checks.py, tensors.py and plan_config.py build and
read these models, and plan.py uses all of them, so the models sit below every one of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from servematrix.config.forge_spec import ForgeSpec
from servematrix.mirror.layout import TensorMeta

TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Invariant(_Model):
    name: str
    rule: str
    holds: bool
    detail: str = ""


class NotMirrored(_Model):
    what: str
    reason: str


class QuantTarget(_Model):
    """One twin linear written in a quantized layout: the forge's fp8_blocks or `quantize:`, or a
    post-processing step."""

    prefix: str
    scheme: str
    forge: bool
    out: int
    in_: int
    params: dict[str, int]
    leaves: dict[str, TensorMeta]  # leaf -> the twin's tensor
    values: dict[str, list[int]] = Field(default_factory=dict)  # leaf -> content (weight_shape)
    # the forge's `quantize:` method that writes it (its model_dump, `tensors` left out), where forged so
    method: dict[str, Any] | None = None


class PostStep(_Model):
    op: Literal["quantize", "cast", "add", "drop", "architectures"]
    names: list[str]
    detail: str


class Plan(_Model):
    source: str
    model_type: str
    architecture: str
    text_model_type: str | None
    max_pp: int
    tp: list[int]
    kv_policy: str
    kept_layers: list[int]  # source layer of each twin layer
    layer_map: dict[int, int]  # every source layer -> the twin layer standing for it
    experts: int | None
    dims: dict[str, list[Any]]  # config field -> [source, twin]
    # validated where plan_twin builds it; one the forge refuses is kept unvalidated for the report
    # (its failed "forge accepts" invariant stops cli_mirror from writing anything)
    spec: SkipValidation[ForgeSpec]
    forged: dict[str, TensorMeta]  # what forge(spec) writes
    twin: dict[str, TensorMeta]  # after post-processing
    quant: list[QuantTarget]
    post: list[PostStep]
    invariants: list[Invariant]
    not_mirrored: list[NotMirrored]
    notes: list[str]
    # config values changed from the source's for the device the twin is served on (cpu_config)
    device_overrides: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.holds for i in self.invariants)

    @property
    def reproducible(self) -> bool:
        """True when the scenario's ForgeSpec alone rebuilds the twin (no post-processing)."""
        return not self.post
