"""The sweep's reports: `run`'s own (report.write_all: summary.json, load-success.md, accuracy.md,
junit.xml, report.html — the grid is the heatmap, architectures down and layout × quant across),
with the coverage counts and the not-checkable reasons heading load-success.md and in coverage.md."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from servematrix.record import RunSummary, ScenarioRecord


class Coverage(BaseModel):
    """Per release: architectures it registers, those the sweep can forge (classification), those
    with a twin built, and cells checked (a load check ran) / passing."""

    release: str
    vllm: str | None = None
    registered: int
    forgeable: int
    twins: set[str] = Field(default_factory=set)
    no_twin: set[str] = Field(default_factory=set)
    checked: int = 0
    passing: int = 0
    failing: int = 0
    served: int = 0  # cells whose real server started and answered a completion (`--depth serve`)
    # cell id -> what the twin lacks that vLLM read (sweep/incomplete.py): checked, neither passing nor failing
    twin_incomplete: dict[str, str] = Field(default_factory=dict)
    not_checkable: dict[str, int] = Field(default_factory=dict)  # reason -> cells
    # the registry table (text, multimodal, pooling kinds, speculative, ...) -> architectures it lists,
    # and those with at least one checked cell: coverage split by group, as the registry splits it
    kinds: dict[str, int] = Field(default_factory=dict)
    kinds_checked: dict[str, set[str]] = Field(default_factory=dict)

    def count(self, record: ScenarioRecord, twin) -> None:
        if record.verdict != "skipped" and record.tags:  # a cell's first tag is its registry table (cells.py)
            self.kinds_checked.setdefault(record.tags[0], set()).add(record.model)
        if record.verdict == "skipped":
            reason = _reason(record.note or "")
            self.not_checkable[reason] = self.not_checkable.get(reason, 0) + 1
            if twin is not None and not twin.ok:
                self.no_twin.add(record.scenario)
            return
        self.twins.add(record.scenario)
        self.checked += 1
        self.passing += record.verdict == "pass"
        self.failing += record.verdict in ("fail", "error")
        if record.verdict == "twin-incomplete":
            self.twin_incomplete[record.id] = (record.note or "").removeprefix("twin-incomplete: the twin lacks ")
        self.served += record.smoke is not None and record.smoke.ok


def _reason(note: str) -> str:
    """A reason without its architecture-specific tail, so like reasons are counted together."""
    note = note.removeprefix("not checkable here: ")
    quant, _, rest = note.partition(": ")
    if rest.startswith("the CPU FP8 block kernel takes K blocks of"):  # the tail names the narrow linears
        return f"{quant}: the twin's linears are narrower than the CPU FP8 block kernel's K block (128) at this TP"
    for head in ("transformers ", "the mirror forges", "the same model_type", "mirror: the twin would break"):
        if note.startswith(head):
            return {"transformers ": "transformers has no class of that name (remote code only, or a vLLM-only name)",
                    "the mirror forges": "the model_type's causal-LM class is another class",
                    "the same model_type": "an alias of an architecture that is swept",
                    "mirror: the twin would break": "mirror: the twin would break its invariants"}[head]
    return note if len(note) < 140 else note[:140] + "…"


def coverage_md(coverage: Iterable[Coverage]) -> str:
    lines = ["## Coverage", "",
             "| release | vLLM | registered | forgeable | twins built | cells checked | passing | failing | "
             "twin-incomplete | served |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    covs = list(coverage)
    for c in covs:
        lines.append(f"| {c.release} | {c.vllm or '?'} | {c.registered} | {c.forgeable} | {len(c.twins)} | "
                     f"{c.checked} | {c.passing} | {c.failing} | {len(c.twin_incomplete)} | {c.served} |")
    lines += ["", "registered: architectures the release's model registry lists; forgeable: matched to a "
                  "transformers model_type whose causal-LM class it is; twins built: the mirror planned and forged "
                  "one; checked: cells whose load check ran (the selection may hold fewer); twin-incomplete: checked "
                  "cells where vLLM read a field or tensor the twin lacks and the family's published checkpoints carry "
                  "(neither passing nor failing: they say nothing about vLLM); served: cells whose real "
                  "server started and answered one greedy completion (`--depth serve`).", ""]
    for c in covs:
        if c.kinds:
            lines += [f"### By registry table ({c.release}): architectures with a checked cell", "",
                      "| table | registered | checked | share |", "|---|---|---|---|"]
            for kind, n in sorted(c.kinds.items(), key=lambda kv: (-kv[1], kv[0])):
                done = len(c.kinds_checked.get(kind, ()))
                lines.append(f"| {kind} | {n} | {done} | {done / n:.0%} |")
            lines.append("")
    for c in covs:
        if c.twin_incomplete:
            lines += [f"### Twin-incomplete ({c.release}): {len(c.twin_incomplete)} cells", ""]
            lines += [f"- `{cid}`: {what}".replace("|", "\\|") for cid, what in sorted(c.twin_incomplete.items())]
            lines.append("")
    for c in covs:
        if c.not_checkable:
            lines += [f"### Not checkable here ({c.release}), cells by reason", ""]
            lines += [f"- {n} × {reason}".replace("|", "\\|") for reason, n in Counter(c.not_checkable).most_common()]
            lines.append("")
    return "\n".join(lines)


def _served_unmarked(summary: RunSummary) -> RunSummary:
    """The grid's view: a served cell (a smoke result, or a failure of the serve step) is a plain ✓/✗, as in `run`'s grid; ᴸ stays
    on the cells that stopped at the load check. summary.json keeps both results."""
    served = [r.smoke is not None or (r.failure is not None and r.failure.phase == "serve") for r in summary.scenarios]
    if not any(served):
        return summary
    rows = [r.model_copy(update={"load_check": None}) if s else r for r, s in zip(summary.scenarios, served)]
    return summary.model_copy(update={"scenarios": rows})


def write_reports(summary: RunSummary, coverage: Iterable[Coverage], trend: dict | None = None,
                  pages_of: Iterable[str] | None = None) -> None:
    """run's reports (pages_of: the ids whose scenario page changed; None: all), then the coverage
    and, with two or more releases, the regression list."""
    from servematrix.report import markdown, write_all
    from servematrix.files import atomic_write

    from servematrix.sweep.regressions import pairs, regressions_md

    covs = list(coverage)
    write_all(summary, trend, pages_of)
    out = Path(summary.run_dir)
    text = coverage_md(covs)
    if len(covs) > 1:  # two or more --vllm: the regression list, between each release and the next
        found = pairs(summary, [c.release for c in covs], {c.release: c.vllm for c in covs})
        atomic_write(out / "regressions.json", "[" + ",\n".join(p.model_dump_json() for p in found) + "]\n")
        text = f"{text}\n{regressions_md(found)}"
    atomic_write(out / "coverage.md", f"# Sweep coverage\n\n{text}")
    grid = markdown.load_success_md(_served_unmarked(summary))
    head, _, rest = grid.partition("\n\n")
    atomic_write(out / "load-success.md", f"{head}\n\n{text}\n{rest}")
