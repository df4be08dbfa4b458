"""Matrix files: scenarios × axes (tp, pp, quant, vllm, device) with include/exclude, tags and
expected outcomes. `load_matrix` validates a file completely (every scenario it names is loaded
too) and `expand` turns it into a list of concrete, stably named entries."""

from __future__ import annotations

import fnmatch
import itertools
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, model_validator

from servematrix.check.accuracy import References, needed_n
from servematrix.config.scenario import MAX_PARALLEL, DeviceName, Gsm8kLimit, Name, Parallel, Scenario, ScenarioStore
from servematrix.config.yamlio import (ConfigError, Located, OneLine, PathText, Regex, Seconds, field_error, is_file,
                               load_yaml, validate)

DEFAULT_VLLM = "current"  # the vLLM installed beside servematrix
DEFAULT_DEVICE = "cpu"
MAX_WORLD = MAX_PARALLEL  # TP×PP ranks of one entry: the GPUs one server spans
MAX_ENTRIES = 10_000  # expanded entries of one file: each starts a server; more is a typo in an axis
MAX_ID_PART = 200  # bytes of an id's layout part, a directory name in every report (255 at most)


def _known_vllm(v: str) -> str:
    from servematrix.serve import envs

    if v != DEFAULT_VLLM and v not in envs.releases():
        raise ValueError(f"unknown vLLM release {v!r} (known: {', '.join(envs.releases())}, "
                         f"{DEFAULT_VLLM}; see servematrix/data/vllm-releases.yaml)")
    return v


def _known_fixes(v: list[str]) -> list[str]:
    import servematrix_fixes

    for name in v:  # the registry only: no fix module (and no vLLM) is imported here
        if name not in servematrix_fixes.REGISTRY:
            raise ValueError(f"unknown fix {name!r} (available: {', '.join(servematrix_fixes.names())})")
    return v


# A vLLM release of servematrix/data/vllm-releases.yaml, or "current".
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
    bug: HttpUrl | None = None
    # regex the failure signature must match for the xfail to count (a different failure is a fail)
    signature: Regex | None = None
    # strict: an xfail entry that passes is reported as xpass and fails the run (drop the waiver)
    strict: bool = True

    @model_validator(mode="after")
    def _xfail_needs_why(self) -> "Expectation":
        if self.expect == "xfail" and (not self.reason or not self.bug):
            raise ValueError("expect: xfail needs a reason and a bug URL")
        if self.expect == "pass" and (self.signature or self.reason):
            raise ValueError("reason/signature only make sense with expect: xfail")
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

    @property
    def is_baseline_layout(self) -> bool:
        return self.tp == 1 and self.pp == 1


def entry_id(scenario: str, tp: int, pp: int, quant: str, vllm: str, device: str,
             fixes: tuple[str, ...] = ()) -> str:
    suffix = "".join(f"-{v}" for v, d in ((vllm, DEFAULT_VLLM), (device, DEFAULT_DEVICE)) if v != d)
    return f"{scenario}/tp{tp}-pp{pp}-{quant}{suffix}" + "".join(f"+{f}" for f in fixes)


class Matrix:
    """A validated matrix file with its scenarios loaded and its entries expanded."""

    def __init__(self, path: Path, spec: MatrixFile, store: ScenarioStore, entries: list[Entry],
                 references: References | None = None, located: Located | None = None):
        self.path, self.spec, self.store, self.entries = path, spec, store, entries
        self.references = references or References([], [])
        self._located = located

    def gsm8k_limit(self, scenario: Scenario, override: int | None = None) -> int | None:
        return override or self.spec.gsm8k.limit or scenario.gsm8k.limit

    def check_power(self, override: int | None = None, entries: list[Entry] | None = None) -> None:
        """Refuse a gsm8k limit too small for an accuracy check to detect the effect it claims
        (at load: the file's own limits over every entry; with --limit: over the selected ones)."""
        for e in self.entries if entries is None else entries:
            scn = self.scenario(e.scenario)
            limit = self.gsm8k_limit(scn, override)
            if limit is None or not scn.gsm8k.enabled or not self.spec.gsm8k.enabled:
                continue
            for i, check in enumerate(scn.accuracy.checks):
                ref = self.references.find(check.metric, e.scenario, e.quant, e.tp, e.pp, e.device, None)
                need = needed_n(check, ref)
                if limit < need:
                    msg = (f"{e.id}: gsm8k limit {limit} cannot detect a {check.effect} change of {check.metric} "
                           f"at alpha={check.alpha}, beta={check.beta}: it needs n >= {need}")
                    if override is not None or self._located is None or self.spec.gsm8k.limit is None:
                        where = self.store.path(e.scenario) if override is None else "--limit"
                        raise ConfigError(where, None, "gsm8k.limit", msg)
                    raise self._located.error(("gsm8k", "limit"), msg)

    def scenario(self, name: str) -> Scenario:
        return self.store.get(name)


def load_matrix(path: Path | str) -> Matrix:
    located = load_yaml(path)
    spec = validate(located, MatrixFile)
    store = ScenarioStore((located.path.parent / spec.scenario_dir).resolve())
    for i, name in enumerate(spec.scenarios):
        _require_scenario(located, store, name, ("scenarios", i))
    for i, inc in enumerate(spec.include):
        _require_scenario(located, store, inc.scenario, ("include", i, "scenario"))
    entries = _expand(located, spec, store)
    references = References.load((located.path.parent / spec.references_dir).resolve())
    matrix = Matrix(located.path, spec, store, entries, references, located)
    matrix.check_power()
    return matrix


def _require_scenario(located: Located, store: ScenarioStore, name: str, loc) -> Scenario:
    try:
        return store.get(name)
    except KeyError:
        known = ", ".join(store.names()) or "none"
        raise located.error(loc, f"unknown scenario {name!r}: no {store.path(name)} (known: {known})") from None


def _expand(located: Located, spec: MatrixFile, store: ScenarioStore) -> list[Entry]:
    entries: dict[str, Entry] = {}

    def add(e: Entry, loc) -> None:
        if e.id in entries:
            raise located.error(loc, f"duplicate scenario id {e.id} (also from {entries[e.id].origin})")
        entries[e.id] = e

    def check_quant(scn: Scenario, quant: str, loc) -> None:
        if quant not in scn.quants:
            raise located.error(loc, f"scenario {scn.name!r} has no quant {quant!r} (it has: {', '.join(scn.quants)})")

    for i, name in enumerate(spec.scenarios):
        scn = store.get(name)
        quants = spec.axes.quant or [scn.default_quant]
        for quant in quants:
            check_quant(scn, quant, ("axes", "quant"))
        for tp, pp, quant, vllm, device in itertools.product(
            spec.axes.tp, spec.axes.pp, quants, spec.axes.vllm, spec.axes.device
        ):
            e = _entry(located, spec, scn, tp, pp, quant, vllm, device, (), (), Expectation(), ("scenarios", i))
            if not any(sel.matches(e) for sel in spec.exclude):
                add(e, ("scenarios", i))
    for i, inc in enumerate(spec.include):
        scn = store.get(inc.scenario)
        quant = inc.quant or scn.default_quant
        check_quant(scn, quant, ("include", i, "quant"))
        expectation = Expectation(**inc.model_dump(include=set(Expectation.model_fields)))
        add(_entry(located, spec, scn, inc.tp, inc.pp, quant, inc.vllm, inc.device, tuple(inc.tags),
                   tuple(inc.fixes), expectation, ("include", i)), ("include", i))
    return [_apply_rules(located, spec, e) for e in entries.values()]


def _entry(located, spec, scn, tp, pp, quant, vllm, device, tags, fixes, expectation, loc) -> Entry:
    if tp * pp > MAX_WORLD:
        where = ("axes", "tp") if loc[0] == "scenarios" else loc + ("tp",)
        raise located.error(where, f"tp {tp} x pp {pp} = {tp * pp} ranks, more than {MAX_WORLD} (the limit)")
    fixes = tuple(dict.fromkeys([*spec.fixes, *fixes]))
    eid = entry_id(scn.name, tp, pp, quant, vllm, device, fixes)
    if len(eid.split("/", 1)[1].encode()) > MAX_ID_PART:  # reports/<run>/<scenario>/<this part>/
        where = ("fixes",) if loc[0] == "scenarios" else loc
        raise located.error(where, f"id {eid} is longer than {MAX_ID_PART} bytes after the scenario name "
                                   "(a directory name in every report): enable fewer fixes or use shorter names")
    return Entry(
        id=eid,
        scenario=scn.name, tp=tp, pp=pp, quant=quant, vllm=vllm, device=device, fixes=fixes,
        tags=tuple(dict.fromkeys([*spec.tags, *scn.tags, *tags])),
        expectation=expectation,
        origin=f"{located.path}:{located.line_of(loc)}",
    )


def _apply_rules(located: Located, spec: MatrixFile, e: Entry) -> Entry:
    for rule in spec.expectations:
        if rule.match.matches(e):
            return e.model_copy(update={"expectation": Expectation(**rule.model_dump(exclude={"match"}))})
    return e


def select(entries: list[Entry], pattern: str | None) -> list[Entry]:
    """`-k` filter: a glob or substring over the id, or `tag:NAME`; comma means OR."""
    if not pattern:
        return list(entries)
    terms = [t.strip() for t in pattern.split(",") if t.strip()]

    def hit(e: Entry, term: str) -> bool:
        if term.startswith("tag:"):
            return term[4:] in e.tags
        if any(c in term for c in "*?["):
            return fnmatch.fnmatchcase(e.id, term)
        return term in e.id

    return [e for e in entries if any(hit(e, t) for t in terms)]


def validate_files(paths: list[Path]) -> list[Matrix]:
    """Load every file, raising the first ConfigError (file:line: field: problem)."""
    out = []
    for p in paths:
        if not is_file(Path(p)):
            raise ConfigError(p, None, None, "no such matrix file")
        out.append(load_matrix(p))
    return out
