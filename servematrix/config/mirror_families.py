"""The schema of servematrix/data/mirror-families.yaml: the mirror's rules (config spellings of
each size, tiny targets, TP roles, what a quantized checkpoint's tensors look like per scheme,
the families' quirks). Read through config/packaged.py, so a damaged file stops at its line.

The sections the code reads by key are typed to their first level or two (a section misspelled or
of the wrong shape is refused); what a family's quirk holds inside is the mirror's business and is
checked where the mirror reads it. The schemes are typed in full: the forge (config/quantize.py)
and the mirror (mirror/schemes.py) both write checkpoints from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FILE = "mirror-families.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchemeTensor(_Strict):
    shape: list[str | int] | Literal["source"]  # dims as expressions of n, k and the scheme's units
    dtype: str | None = None  # a safetensors dtype code or `float` (the scales' float dtype)
    optional: bool = False  # written only where the source has it
    value: list[str | int] | None = None  # written as the tensor's content (e.g. the unpacked shape)


class Scheme(_Strict):
    methods: list[str]  # quantization_config.quant_method values that carry it
    match: dict[str, str]  # tensor leaf -> dtype code (or `any`) that identifies the scheme
    tensors: dict[str, SchemeTensor]
    align: dict[str, str] = Field(default_factory=dict)  # dim -> the unit it must be a multiple of
    forge: str | None = None  # the ForgeSpec field that writes it whole (else post-processed)
    requires: dict[str, float] = Field(default_factory=dict)  # what serving it needs (Requires' fields)


class MirrorFamilies(_Strict):
    layer_containers: list[str]
    # a tie's divisor may be a number (fields.ties: Mamba-2's intermediate_size = hidden_size x expand / 1)
    fields: dict[str, list[str] | dict[str, list[str | int]]]
    targets: dict[str, int]
    tp_roles: dict[str, list[str]]
    schemes: dict[str, Scheme]
    scale_leaves: list[str]
    index_leaves: list[str]
    quant_leaves: list[str]
    quant_config: dict[str, list[str]]
    load_check: dict[str, str]
    model_type_config: dict[str, dict[str, Any]]
    cpu_config: dict[str, dict[str, Any]]
    unmirrorable: dict[str, str]
    checkpoint_names: dict[str, list[dict[str, Any]]]
    every_layer: dict[str, list[str]]
    checkpoint_config: dict[str, dict[str, Any]]
