"""Across releases: the regression list of a sweep over two or more `--vllm`, between each release
and the next in the order given (`--vllm OLD --vllm NEW`), by report/comparison.py's one rule: a
cell is newly failing when it went from meeting its expectation (pass, xfail) to missing it (fail,
xpass), newly passing the other way round; a skip or an error is no verdict on vLLM, so neither.

A cell is the same cell on both releases when its id without the release suffix is the same
(`glm_moe_dsa/pp2-fp8-block-cpu-0.20.2` and `glm_moe_dsa/pp2-fp8-block`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from servematrix.record import RunSummary, ScenarioRecord
from servematrix.report.comparison import MET, MISSED, compare_runs
from servematrix.serve.envs import CURRENT


class ReleasePair(BaseModel):
    before: str
    after: str
    before_vllm: str | None = None
    after_vllm: str | None = None
    compared: int = 0  # cells present on both
    # of those, the cells with a verdict on vLLM on both (a cell skipped or not checkable on either release, as every
    # fp8-block cell of the CUDA wheel on a CPU host, is on both and says nothing): what the list really compared
    judged: int = 0
    newly_failing: list[str] = Field(default_factory=list)  # "<cell>: pass → fail (signature)"
    newly_passing: list[str] = Field(default_factory=list)
    only_before: list[str] = Field(default_factory=list)
    only_after: list[str] = Field(default_factory=list)
    # of the cells only one release has: those the other release was asked to run too, and has no
    # record of (the sweep stopped before them); the rest that release never selected (not in its
    # registry, or past --limit)
    not_run_before: list[str] = Field(default_factory=list)
    not_run_after: list[str] = Field(default_factory=list)


def cell_key(record: ScenarioRecord) -> str:
    """The id less its `-<release>` suffix (current's ids have none)."""
    suffix = "" if record.vllm == CURRENT else f"-{record.vllm}"
    return record.id[: len(record.id) - len(suffix)] if suffix and record.id.endswith(suffix) else record.id


def _selected(summary: RunSummary, release: str, releases: list[str]) -> set[str]:
    """The cell keys `release` was asked to run (the run's `selected` ids carry the same suffixes)."""
    suffixes = [r for r in releases if r != CURRENT]
    out = set()
    for rid in summary.selected:
        owner = next((r for r in suffixes if rid.endswith(f"-{r}")), CURRENT)
        if owner == release:
            out.add(rid if owner == CURRENT else rid[: -len(owner) - 1])
    return out


def _view(summary: RunSummary, release: str) -> RunSummary:
    rows = [r.model_copy(update={"id": cell_key(r)}) for r in summary.scenarios if r.vllm == release]
    return summary.model_copy(update={"scenarios": rows})


def pairs(summary: RunSummary, releases: list[str], versions: dict[str, str | None] | None = None) -> list[ReleasePair]:
    versions = versions or {}
    out = []
    for before, after in zip(releases, releases[1:]):
        a, b = _view(summary, before), _view(summary, after)
        verdict = {r.id: r.verdict for r in a.scenarios}
        changes = compare_runs(a, b, refuse=False)  # a sweep measures no gsm8k: nothing to refuse
        was = {r.id: r.failure.signature for r in a.scenarios if r.failure is not None}
        # a fixed cell says what it failed with before (the comparison names the new signature only)
        fixed = [f"{x} (was {was[x.split(': ', 1)[0]]})" if x.split(": ", 1)[0] in was else x
                 for x in changes.newly_passing]
        out.append(ReleasePair(before=before, after=after, before_vllm=versions.get(before),
                               after_vllm=versions.get(after),
                               compared=len({r.id for r in a.scenarios} & {r.id for r in b.scenarios}),
                               judged=sum(1 for r in b.scenarios if r.verdict in MET | MISSED
                                          and verdict.get(r.id) in MET | MISSED),
                               newly_failing=changes.newly_failing, newly_passing=fixed,
                               only_before=changes.only_in_a, only_after=changes.only_in_b,
                               not_run_before=sorted(set(changes.only_in_b) & _selected(summary, before, releases)),
                               not_run_after=sorted(set(changes.only_in_a) & _selected(summary, after, releases))))
    return out


def regressions_md(found: list[ReleasePair]) -> str:
    if not found:
        return ""
    lines = ["## Across releases: the regression list", ""]
    for p in found:
        name = lambda rel, v: f"{rel}" + (f" ({v})" if v else "")  # noqa: E731 - two uses, one line
        lines += [f"### {name(p.before, p.before_vllm)} → {name(p.after, p.after_vllm)}: {p.compared} cells on both, "
                  f"{len(p.newly_failing)} newly failing, {len(p.newly_passing)} newly passing", "",
                  f"- {p.judged} of the {p.compared} with a verdict on both (the rest skipped or not checkable on "
                  f"one release or both)"]
        lines += [f"- newly failing: {x}".replace("|", "\\|") for x in p.newly_failing]
        lines += [f"- newly passing: {x}".replace("|", "\\|") for x in p.newly_passing]
        if not (p.newly_failing or p.newly_passing):
            lines.append("- no cell changed between meeting and missing its expectation")
        for here, there, only, not_run in ((p.before, p.after, p.only_before, p.not_run_after),
                                           (p.after, p.before, p.only_after, p.not_run_before)):
            if only:
                lines.append(f"- only on {here}: {len(only)} cells: {len(not_run)} selected on {there} too and not "
                             f"run there (the sweep stopped before them), {len(only) - len(not_run)} not selected on "
                             f"{there} (not in its registry, or past --limit)")
        lines.append("")
    return "\n".join(lines)
