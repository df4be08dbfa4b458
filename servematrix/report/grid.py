"""The load-success grid: scenarios down, layouts (TP×PP×quant, release, device, fixes) across;
shared by the markdown and the HTML report."""

from __future__ import annotations

from collections import defaultdict

from servematrix.record import RunSummary, ScenarioRecord


SYMBOL = {"pass": "✓", "fail": "✗", "xfail": "✗ (xfail)", "xpass": "✓ (xpass!)", "error": "⚠ error",
          "skipped": "–", "twin-incomplete": "◌ twin-incomplete"}


def _column(r: ScenarioRecord) -> str:
    extra = "".join(f" {v}" for v, d in ((r.vllm, "current"), (r.device, "cpu")) if v != d)
    fixes = "".join(f" +{f}" for f in r.enabled_fixes)
    return f"TP{r.tp}×PP{r.pp} {r.quant}{extra}{fixes}"


def grid(summary: RunSummary) -> tuple[list[str], dict[str, dict[str, ScenarioRecord]]]:
    """The load-success matrix: columns (TP×PP×quant…) in first-seen order, rows by scenario."""
    rows: dict[str, dict[str, ScenarioRecord]] = defaultdict(dict)
    columns: list[str] = []
    for r in summary.scenarios:
        col = _column(r)
        if col not in columns:
            columns.append(col)
        rows[r.scenario][col] = r
    return columns, rows


def cell_signature(r: ScenarioRecord) -> str | None:
    return r.failure.signature if r.failure else None
