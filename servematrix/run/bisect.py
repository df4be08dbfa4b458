"""Bisect: between two vLLM releases (every version the registry publishes between them, not only
the declared ones), the adjacent pair where one scenario's outcome changes (the last release
where it passes and the first where it fails, or the reverse for a fix), running the
scenario — the same entry, only its `vllm` axis changed — on as few releases as the search needs,
and building each release's environment only when the search reaches it.

A probe is good (the scenario met no failure), bad (it failed; with --signature, with a failure
matching it) or other (any other failure, or an infrastructure error): an "other" release is
skipped like `git bisect skip`, and the search goes on among the rest.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from servematrix.config.matrix import Entry, Matrix
from servematrix.config.matrix_spec import entry_id
from servematrix.record import ScenarioRecord
from servematrix.run import rundir
from servematrix.config import releases
from servematrix.serve import envs
from servematrix.versions import version_key  # noqa: F401 - the one release order, importable from here as before

Outcome = Literal["good", "bad", "other"]


class Probe(BaseModel):
    release: str
    outcome: Outcome
    verdict: str
    signature: str | None = None
    log: str | None = None
    vllm_version: str | None = None


class BisectResult(BaseModel):
    scenario: str
    releases: list[str]
    probes: list[Probe]
    pair: tuple[Probe, Probe] | None = None  # adjacent (in the releases that were not skipped)
    change: Literal["regression", "fix", "none"] = "none"


def candidates(low: str, high: str) -> list[str]:
    """Every release from `low` to `high` (names or bare versions), oldest first: each version the
    package registry publishes in between, not only the declared ones (config/releases.py names
    them; an undeclared one is resolved, and its environment built, only when the search reaches it)."""
    return releases.between(low, high, "--between")


def check_out(out: Path, overwrite: bool) -> None:
    """Every run directory the search may reach (the bisect's, and each probe's under it), refused
    now rather than after hours of probes, and before the registry is asked which releases there are."""
    rundir.check(out, overwrite, marker="bisect.json")
    if out.is_dir():
        for sub in sorted(out.iterdir()):
            if sub.is_dir() and not sub.is_symlink() and not sub.name.startswith("."):
                rundir.check(sub, overwrite)


def run_as(release: str, current: str) -> str:
    """The release a probe runs on: `current` where it is the vLLM this interpreter already runs (no
    environment of its own needed), else the release, resolved from the registry if undeclared."""
    rel = envs.release(release, "--between")
    return envs.CURRENT if current and rel.version == current else rel.name


def retarget(entry: Entry, release: str) -> Entry:
    """The same entry on another release: only the vllm axis (and so the id) changes."""
    return entry.model_copy(update={"vllm": release, "id": entry_id(entry.scenario, entry.tp, entry.pp, entry.quant,
                                                                     release, entry.device, entry.fixes)})


def classify(rec: ScenarioRecord, signature: str | None) -> Outcome:
    if rec.failure is None:
        return "good"
    if rec.failure.infra:
        return "other"
    if signature and not re.search(signature, rec.failure.signature):
        return "other"
    return "bad"


def search(releases: list[str], probe) -> tuple[list[Probe], tuple[Probe, Probe] | None]:
    """Binary search for adjacent probes with different outcomes; `probe(release) -> Probe`."""
    done: dict[str, Probe] = {}

    def run(name: str) -> Probe:
        if name not in done:
            done[name] = probe(name)
        return done[name]

    alive = list(releases)
    lo, hi = 0, len(alive) - 1
    while lo <= hi and run(alive[lo]).outcome == "other":
        lo += 1
    while hi >= lo and run(alive[hi]).outcome == "other":
        hi -= 1
    if hi <= lo or run(alive[lo]).outcome == run(alive[hi]).outcome:
        return list(done.values()), None
    start = run(alive[lo]).outcome
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = run(alive[mid])
        if p.outcome == "other":
            del alive[mid]  # skipped: search among the others
            hi -= 1
            continue
        if p.outcome == start:
            lo = mid
        else:
            hi = mid
    return list(done.values()), (done[alive[lo]], done[alive[hi]])


def probe_of(release: str, rec: ScenarioRecord, run_dir: Path, signature: str | None) -> Probe:
    """A probe from the record a release's run gave: a record that was not run there (skipped: not
    checkable, no slot) cannot be judged, like an infrastructure error; the rest by `classify`."""
    if rec.verdict == "skipped":
        return Probe(release=release, outcome="other", verdict=rec.verdict, signature=rec.note,
                     vllm_version=rec.vllm_version)
    log = run_dir / rec.id / "server.log"
    return Probe(release=release, outcome=classify(rec, signature), verdict=rec.verdict,
                 signature=rec.failure.signature if rec.failure else None,
                 log=str(log) if log.exists() else None, vllm_version=rec.vllm_version)


def run_bisect(name: str, low: str, high: str, out: Path, signature: str | None, run_one,
               python: str | None = None, overwrite: bool = False) -> BisectResult:
    """The one bisect, for a matrix entry and a sweep cell alike: every run directory checked
    first, then the search, each probe one run of the release (`run_one(release_name, run_dir) ->
    the record`, where release_name is `current` for the vLLM this interpreter runs), judged by
    `probe_of`."""
    check_out(out, overwrite)
    releases = candidates(low, high)
    for release in releases:
        rundir.check(out / release, overwrite)
    current = (envs.probe(python or sys.executable).get("vllm") or "").split("+")[0]

    def probe(release: str) -> Probe:
        run_dir = (out / release).resolve()
        # resolved (and its environment built by the run) only when the search reaches it
        return probe_of(release, run_one(run_as(release, current), run_dir), out / release, signature)

    probes, pair = search(releases, probe)
    change = "none"
    if pair is not None:
        change = "regression" if pair[0].outcome == "good" else "fix"
    return BisectResult(scenario=name, releases=releases, probes=probes, pair=pair, change=change)


def bisect(matrix: Matrix, entry, low: str, high: str, out: Path, signature: str | None,
           python: str | None = None, overwrite: bool = False) -> BisectResult:
    """A matrix entry: each probe a one-entry Session run of the same entry on the release."""
    from servematrix.run.options import RunOptions
    from servematrix.run.session import Session

    signature = signature or (entry.expectation.signature if entry is not None and entry.expectation.expect == "xfail"
                              else None)

    def run_one(release: str, run_dir: Path) -> ScenarioRecord:
        e = retarget(entry, release)
        opts = RunOptions.of(run_dir, python=python, gsm8k=False, retries=0, overwrite=overwrite)
        (rec,) = Session.of(matrix, [e], opts).run().scenarios
        return rec

    return run_bisect(entry.id if entry is not None else "", low, high, out, signature, run_one, python, overwrite)
