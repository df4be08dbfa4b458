"""Expanding a validated matrix file into entries: scenarios x axes, the include list, the
exclude selectors, then the expectation rules, each entry with a stable id and the file:line it
came from; and `select`, the `-k` filter over the entries.

Separate from matrix.py, which reads a file and checks what it names: expansion reads no file,
only the validated spec and the scenarios already loaded.
"""

from __future__ import annotations

import fnmatch
import itertools

from servematrix.config.matrix_spec import Entry, Expectation, MatrixFile, entry_id
from servematrix.config.scenario import MAX_PARALLEL, Scenario, ScenarioStore
from servematrix.config.yamlio import Located

MAX_WORLD = MAX_PARALLEL  # TP×PP ranks of one entry: the GPUs one server spans
MAX_ID_PART = 200  # bytes of an id's layout part, a directory name in every report (255 at most)


def expand(located: Located, spec: MatrixFile, store: ScenarioStore) -> list[Entry]:
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
