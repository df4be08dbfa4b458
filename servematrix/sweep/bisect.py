"""`servematrix bisect CELL --between LOW HIGH` for a sweep cell id (`glm_moe_dsa/pp2-fp8-block`):
run/bisect.py's bisect (the one a matrix entry takes), each probe a one-cell sweep of that release
(its own run directory under the bisect's, the same twin and load check the sweep runs).

A sweep cell id is told from a matrix entry id by its form: `<key>/<layout>-<quant>[-<release>]`
with a layout of tp<T>, pp<P> or tp<T>pp<P> and a quant the sweep knows; an entry id is always
`<scenario>/tp<T>-pp<P>-<quant>…`, which never parses as one.
"""

from __future__ import annotations

import re
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
    """run/bisect.py's bisect (`run_bisect`), each probe a one-cell sweep of the release."""
    from servematrix.sweep.runner import SweepOptions, run

    sweep = sweep or run

    def run_one(release: str, run_dir: Path):
        cell_id = cell.on(release)
        # `-k` takes a substring (llama/… is in codellama/…): a glob of the id's own first letter is exact
        opts = SweepOptions(releases=[release], layouts=[cell.layout], quants=[cell.quant],
                            k=f"[{cell_id[0]}]{cell_id[1:]}", out=run_dir, overwrite=overwrite, timeout=timeout)
        return next(r for r in sweep(opts).scenarios if r.id == cell_id)

    return rb.run_bisect(cell.on(envs.CURRENT), low, high, out, signature, run_one, overwrite=overwrite)
