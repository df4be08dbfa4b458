"""What a matrix file may say (its axes, include/exclude selectors, expectation rules and their
bounds) and the Entry each expanded combination becomes, as pydantic models.

Separate from matrix.py (loading a file into a Matrix) and expand.py (turning it into entries):
these are the schema both read; Selector.matches and Entry sit together so neither module has
to import the other.
"""

from __future__ import annotations

import datetime
import fnmatch
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from servematrix import versions
from servematrix.config.fields import BugLink, OneLine, PathText, Regex, Seconds
from servematrix.config.scenario import DeviceName, Gsm8kLimit, Name, Parallel
from servematrix.config.yamlio import field_error

DEFAULT_VLLM = "current"  # the vLLM installed beside servematrix
DEFAULT_DEVICE = "cpu"
MAX_ENTRIES = 10_000  # expanded entries of one file: each starts a server; more is a typo in an axis


def _known_vllm(v: str) -> str:
    """A known release's name, or any published version X.Y.Z (resolved from the registry, not
    cached: the run caches it when it builds the release) as the name of the release it resolves to."""
    from servematrix.config import releases
    from servematrix.errors import ArgumentError

    if v == DEFAULT_VLLM:
        return v
    try:
        return releases.canonical(v, "vllm", save=False)  # validating a file writes nothing
    except ArgumentError as exc:
        raise ValueError(f"unknown vLLM release {v!r}: {exc.message}") from None


def _known_fixes(v: list[str]) -> list[str]:
    import servematrix_fixes

    for name in v:  # the registry only: no fix module (and no vLLM) is imported here
        if name not in servematrix_fixes.REGISTRY:
            raise ValueError(f"unknown fix {name!r} (available: {', '.join(servematrix_fixes.names())})")
    return v


def _until(v: object) -> str:
    """A waiver's end: an ISO date (YAML reads an unquoted 2027-01-31 as a date) or a release of a
    declared family (`cpu-0.33.0`: it need not be declared yet — a waiver usually names the release
    expected to fix it). Kept as text; read by versions.parse_until (bounded: a 5,000-digit release
    is refused here, at its line) and judged by report/waivers.py."""
    if isinstance(v, datetime.datetime):  # a timestamp: a waiver ends on a day, not at an hour
        raise ValueError("a date (YYYY-MM-DD) without a time, or a release such as cpu-0.33.0")
    if isinstance(v, datetime.date):
        return v.isoformat()
    end = versions.parse_until(v)  # a VersionError is a ValueError: reported at this field's line
    if isinstance(end, datetime.date):
        return end.isoformat()
    from servematrix.config import releases

    families = sorted({name.split("-", 1)[0] for name in releases.all_releases() if "-" in name})
    if end[0] not in families:
        raise ValueError(f"expected a date (YYYY-MM-DD) or a release <family>-<version> of a declared family "
                         f"({', '.join(f + '-X.Y.Z' for f in families)}; servematrix/data/vllm-releases.yaml), "
                         f"got {v!r}")
    return v


# When a waiver (xfail) stops being trusted: a date, or a release at/after which it has expired.
Until = Annotated[str, BeforeValidator(_until)]
# A known vLLM release (config/releases.py), a published version X.Y.Z, or "current".
VllmName = Annotated[str, AfterValidator(_known_vllm)]
# Fix modules of the servematrix_fixes registry (checked as a list: the error names the list).
Fixes = Annotated[list[Name], AfterValidator(_known_fixes)]
# A selector's value: fnmatch glob over an entry's field.
Glob = Annotated[OneLine, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expectation(_Strict):
    expect: Literal["pass", "xfail"] = "pass"
    reason: OneLine | None = None  # printed after the id in `list` and in every report line
    bug: BugLink | None = None  # the upstream issue/PR, or servematrix's write-up where upstream has none
    # regex the failure signature must match for the xfail to count (a different failure is a fail)
    signature: Regex | None = None
    # strict: an xfail entry that passes is reported as xpass and fails the run (drop the waiver)
    strict: bool = True
    # the waiver expires on this date or from this release on (`servematrix waivers` lists its state)
    until: Until | None = None

    @model_validator(mode="after")
    def _xfail_needs_why(self) -> "Expectation":
        if self.expect == "xfail" and (not self.reason or not self.bug):
            raise ValueError("expect: xfail needs a reason and a bug (upstream URL or docs/ write-up)")
        if self.expect == "pass" and (self.signature or self.reason or self.until):
            raise ValueError("reason/signature/until only make sense with expect: xfail")
        return self


class Selector(_Strict):
    """Matches expanded entries; every given field must match (quant/vllm/device accept globs)."""

    scenario: Glob | None = None
    tp: Parallel | None = None
    pp: Parallel | None = None
    quant: Glob | None = None
    vllm: Glob | None = None
    device: Glob | None = None
    tag: Name | None = None

    def matches(self, e: "Entry") -> bool:
        for field in ("scenario", "quant", "vllm", "device"):
            want = getattr(self, field)
            if want is not None and not fnmatch.fnmatchcase(getattr(e, field), want):
                return False
        if self.tp is not None and self.tp != e.tp:
            return False
        if self.pp is not None and self.pp != e.pp:
            return False
        return self.tag is None or self.tag in e.tags


class Rule(Expectation):
    match: Selector


class IncludeEntry(Expectation):
    scenario: Name
    fixes: Fixes = Field(default_factory=list)  # fix modules enabled for this entry
    tp: Parallel = 1
    pp: Parallel = 1
    quant: Name | None = None
    vllm: VllmName = DEFAULT_VLLM
    device: DeviceName = DEFAULT_DEVICE
    tags: list[Name] = Field(default_factory=list)


class Axes(_Strict):
    tp: list[Parallel] = Field(default_factory=lambda: [1], min_length=1)
    pp: list[Parallel] = Field(default_factory=lambda: [1], min_length=1)
    quant: list[Name] | None = Field(None, min_length=1)  # None: each scenario's first quant
    vllm: list[VllmName] = Field(default_factory=lambda: [DEFAULT_VLLM], min_length=1)
    device: list[DeviceName] = Field(default_factory=lambda: [DEFAULT_DEVICE], min_length=1)

    def size(self) -> int:
        """Entries one scenario expands to (no quant axis: the scenario's first quant, one)."""
        return math.prod([len(self.tp), len(self.pp), len(self.quant or [None]), len(self.vllm), len(self.device)])


class MatrixGsm8k(_Strict):
    limit: Gsm8kLimit | None = None
    enabled: bool = True


class MatrixFile(_Strict):
    name: Name
    description: str = ""
    scenario_dir: PathText = "../scenarios"
    references_dir: PathText = "../references"
    scenarios: list[Name] = Field(default_factory=list)
    axes: Axes = Axes()
    include: list[IncludeEntry] = Field(default_factory=list)
    exclude: list[Selector] = Field(default_factory=list)
    expectations: list[Rule] = Field(default_factory=list)
    tags: list[Name] = Field(default_factory=list)
    fixes: Fixes = Field(default_factory=list)  # fix modules enabled for every entry
    gsm8k: MatrixGsm8k = MatrixGsm8k()
    startup_timeout: Seconds | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "MatrixFile":
        total = len(self.scenarios) * self.axes.size() + len(self.include)
        if total > MAX_ENTRIES:
            raise field_error(("axes",), f"expands to {total} entries (scenarios x tp x pp x quant x vllm x "
                                         f"device + include), more than {MAX_ENTRIES} (the limit)")
        return self


class Entry(_Strict):
    """One expanded scenario: a model at one layout, with what we expect of it."""

    id: str
    scenario: str
    tp: int
    pp: int
    quant: str
    vllm: str
    device: str
    tags: tuple[str, ...]
    fixes: tuple[str, ...] = ()
    expectation: Expectation
    origin: str  # file:line that produced it


def entry_id(scenario: str, tp: int, pp: int, quant: str, vllm: str, device: str,
             fixes: tuple[str, ...] = ()) -> str:
    suffix = "".join(f"-{v}" for v, d in ((vllm, DEFAULT_VLLM), (device, DEFAULT_DEVICE)) if v != d)
    return f"{scenario}/tp{tp}-pp{pp}-{quant}{suffix}" + "".join(f"+{f}" for f in fixes)
