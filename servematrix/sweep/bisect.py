"""`servematrix bisect CELL --between LOW HIGH` for a sweep cell id (`glm_moe_dsa/pp2-fp8-block`):
run/bisect.py's search, each probe a one-cell sweep of that release (its own run directory under
the bisect's, the same twin and load check the sweep runs), judged by run/bisect.py's classify.

A sweep cell id is told from a matrix entry id by its form: `<key>/<layout>-<quant>[-<release>]`
with a layout of tp<T>, pp<P> or tp<T>pp<P> and a quant the sweep knows; an entry id is always
`<scenario>/tp<T>-pp<P>-<quant>…`, which never parses as one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic import BaseModel

from servematrix.run import bisect as rb
from servematrix.serve import envs
from servematrix.sweep import cells

_ID = re.compile(r"^(?P<key>[^/\s]+)/(?P<layout>(?:tp[1-9]\d?)?(?:pp[1-9]\d?)?)-(?P<rest>\S+)$")


class CellId(BaseModel):
    key: str
    layout: cells.Layout
    quant: str
    release: str = envs.CURRENT  # the suffix, if the id had one (the bisect replaces it)

    @property
    def id(self) -> str:
        return self.on(self.release)

    def on(self, release: str) -> str:
        suffix = "" if release == envs.CURRENT else f"-{release}"
        return f"{self.key}/{self.layout.name}-{self.quant}{suffix}"


def parse(cell_id: str) -> CellId | None:
    """The cell id's parts, or None when it is not a sweep cell id."""
    from servematrix.sweep.quant import names

    m = _ID.match(cell_id)
    if not m or not m["layout"]:
        return None
    for q in sorted(names(), key=len, reverse=True):  # fp8-block before a shorter name it starts with
        rest = m["rest"]
        if rest == q or rest.startswith(q + "-"):
            release = rest[len(q) + 1:] or envs.CURRENT
            return CellId(key=m["key"], layout=cells.layout(m["layout"]), quant=q, release=release)
    return None


def bisect_cell(cell: CellId, low: str, high: str, out: Path, signature: str | None, overwrite: bool = False,
                timeout: float = 300.0, sweep=None) -> rb.BisectResult:
    from servematrix.run import rundir
    from servematrix.sweep.runner import SweepOptions, run

    sweep = sweep or run
    rb.check_out(out, overwrite)
    releases = rb.candidates(low, high)
    for release in releases:
        rundir.check(out / release, overwrite)
    current = (envs.probe(sys.executable).get("vllm") or "").split("+")[0]

    def probe(release: str) -> rb.Probe:
        name = rb.run_as(release, current)  # resolved (and its environment built by the sweep) only when reached
        cell_id = cell.on(name)
        # `-k` takes a substring (llama/… is in codellama/…): a glob of the id's own first letter is exact
        opts = SweepOptions(releases=[name], layouts=[cell.layout], quants=[cell.quant],
                            k=f"[{cell_id[0]}]{cell_id[1:]}",
                            out=(out / release).resolve(), overwrite=overwrite, timeout=timeout)
        summary = sweep(opts)
        rec = next(r for r in summary.scenarios if r.id == cell_id)
        if rec.verdict == "skipped":  # not checkable there (no twin, not registered): no verdict on vLLM
            return rb.Probe(release=release, outcome="other", verdict=rec.verdict, signature=rec.note,
                            vllm_version=rec.vllm_version)
        log = out / release / cell_id / "server.log"
        return rb.Probe(release=release, outcome=rb.classify(rec, signature), verdict=rec.verdict,
                        signature=rec.failure.signature if rec.failure else None,
                        log=str(log) if log.exists() else None, vllm_version=rec.vllm_version)

    probes, pair = rb.search(releases, probe)
    change = "none" if pair is None else ("regression" if pair[0].outcome == "good" else "fix")
    return rb.BisectResult(scenario=cell.on(envs.CURRENT), releases=releases, probes=probes, pair=pair, change=change)
