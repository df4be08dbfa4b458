"""References and the checks that use them, as data: `references/*.yaml` (keyed by scenario, quant,
TP, PP, device and a vLLM version range, each with the mean, per-sample σ and n it was measured
with) and a scenario's `accuracy.checks` (which metric, the effect to detect, α, β). Read and
validated here; judged in check.accuracy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from servematrix.config.yamlio import field_error, load_yaml, validate
from servematrix.record import METRIC_DEFS, METRICS, Protocol

BERNOULLI = {name for name, m in METRIC_DEFS.items() if m.proportion}  # record.METRIC_DEFS says which


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The smallest effect a check may claim: the n it needs grows as 1/effect², and below this it is
# beyond any test set (a 1e-4 change of a proportion needs ~10^8 questions).
MIN_EFFECT = 1e-4
MAX_NLL_EFFECT = 100.0  # nats per token: far beyond any real change of a model's NLL


class Check(_Strict):
    """One guarded metric: detect a true change of `effect` at significance α with power 1-β."""

    metric: str
    effect: float = Field(strict=True, ge=MIN_EFFECT, le=MAX_NLL_EFFECT, allow_inf_nan=False)
    alpha: float = Field(0.05, strict=True, gt=0, lt=0.5, allow_inf_nan=False)
    beta: float = Field(0.2, strict=True, gt=0, lt=0.5, allow_inf_nan=False)

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r} (known: {', '.join(METRICS)})")
        return v

    @model_validator(mode="after")
    def _proportion_effect(self) -> "Check":
        if self.metric in BERNOULLI and self.effect >= 1:  # a proportion cannot move by 1 or more
            raise field_error(("effect",), f"{self.metric} is a proportion: effect must be below 1 (got {self.effect})")
        return self


class RefKey(_Strict):
    scenario: str
    quant: str
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    vllm: str = ""  # PEP 440 specifier on the vLLM version, "" = any

    @field_validator("vllm")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            SpecifierSet(v)
        except InvalidSpecifier as exc:
            raise ValueError(f"not a version range: {v!r}") from exc
        return v

    def matches(self, scenario: str, quant: str, tp: int, pp: int, device: str, vllm: str | None) -> bool:
        if (self.scenario, self.quant, self.tp, self.pp, self.device) != (scenario, quant, tp, pp, device):
            return False
        if not self.vllm or vllm is None:
            return True
        try:
            return Version(vllm.split("+")[0]) in SpecifierSet(self.vllm)
        except InvalidVersion:
            return False


class Reference(_Strict):
    key: RefKey
    metric: str
    # finite and bounded: a reference is data someone may edit, and a sigma of 1e200 would overflow
    # the power calculation at validate time instead of being refused at its line
    mean: float = Field(allow_inf_nan=False, ge=-1e6, le=1e6)
    sigma: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    n: int = Field(ge=1, le=10_000_000)
    stderr: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    source: str | None = None  # the run it was recorded from
    recorded_at: str | None = None
    # what it was measured with (check.gsm8k.protocol): a run measured otherwise is not compared
    # with it; references recorded before fingerprints have none ("no fingerprint")
    protocol: Protocol | None = None
    # per-question spread of a layout's differences from its baseline (its paired test), so that
    # validate can say what the paired test detects before the next run
    paired_sigma: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)


class ReferenceFile(_Strict):
    references: list[Reference] = Field(default_factory=list)


# A references file's entries by the digest of its bytes. Every matrix that gates accuracy loads the
# file again (validate, run, report, the config fuzz tests thousands of times), and the located YAML
# reader that gives errors their file:line is pure Python: ~0.3 s for references/gsm8k.yaml. Keyed by
# content, an edited file is parsed again; a file that fails raises each time (nothing is cached for
# it), naming its own path. The entries are frozen models, safe to share.
_ENTRIES: dict[str, tuple[Reference, ...]] = {}
_ENTRIES_KEPT = 16


def _entries(path: Path) -> tuple[Reference, ...]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest not in _ENTRIES:
        located = load_yaml(path)
        entries = tuple(validate(located, ReferenceFile).references) if located.data is not None else ()
        while len(_ENTRIES) >= _ENTRIES_KEPT:
            _ENTRIES.pop(next(iter(_ENTRIES)))  # the oldest: a long-lived process sees few versions
        _ENTRIES[digest] = entries
    return _ENTRIES[digest]


class References:
    def __init__(self, refs: list[Reference], paths: list[Path]):
        self.refs, self.paths = refs, paths

    @classmethod
    def load(cls, directory: Path) -> "References":
        paths = sorted(Path(directory).glob("*.yaml")) if Path(directory).is_dir() else []
        return cls([r for p in paths for r in _entries(p)], paths)

    def find(self, metric: str, scenario: str, quant: str, tp: int, pp: int, device: str,
             vllm: str | None) -> Reference | None:
        hits = [r for r in self.refs if r.metric == metric and r.key.matches(scenario, quant, tp, pp, device, vllm)]
        return hits[-1] if hits else None  # the latest recorded wins


HEADER = "# Accuracy references, written by `servematrix reference record RUN_DIR` from a trusted run.\n"


def dump_references(refs: list[Reference], header: str | None = None) -> str:
    """The references file's text: `header` (the existing file's leading comments, kept) or ours."""
    data = {"references": [r.model_dump(exclude_none=True) for r in refs]}
    return (header or HEADER) + yaml.safe_dump(data, sort_keys=False)


def leading_comments(text: str) -> str:
    """The comment (and blank) lines a file begins with: someone's notes, kept when `reference
    record` rewrites it. A file of comments only parses as empty (no references) but is all notes."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    head = "".join(lines).rstrip("\n")
    return head + "\n" if head.strip() else ""
