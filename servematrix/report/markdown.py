"""load-success.md and accuracy.md: the run as two markdown tables."""

from __future__ import annotations

import math

from servematrix.record import RunSummary
from servematrix.report.grid import SYMBOL, grid


def load_success_md(summary: RunSummary) -> str:
    """Models down, TP×PP×quant across; a ✗ cell names its failure signature in a footnote."""
    columns, rows = grid(summary)
    notes: list[str] = []
    lines = [
        f"# Load success — {summary.matrix}",
        "",
        f"vLLM {summary.vllm_version or '?'} · torch {summary.torch_version or '?'} · host {summary.host} · "
        f"started {summary.started_at} · status **{summary.status}**",
        "",
        "| scenario | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for scenario, cells in rows.items():
        out = []
        for col in columns:
            r = cells.get(col)
            if r is None:
                out.append("")
                continue
            text = SYMBOL[r.verdict] + (" ᴸ" if r.load_check is not None else "")
            if r.failure or r.note:
                notes.append(f"{r.id}: " + "; ".join(
                    x for x in (r.failure and f"[{r.failure.phase}/{r.failure.kind}] {r.failure.signature}", r.note) if x))
                text += f" [{len(notes)}]"
            out.append(text)
        lines.append(f"| {scenario} | " + " | ".join(out) + " |")
    if notes:
        lines += ["", *(f"{i}. {n}".replace("|", "\\|") for i, n in enumerate(notes, 1))]
    if any(r.load_check is not None for r in summary.scenarios):
        lines += ["", "ᴸ load check, no server (the scenario says why this device cannot serve it): vLLM's own "
                      "code builds the model under the entry's layout and quantization and, unless the "
                      "scenario checks construction only, loads its weights; a PP layout must load exactly "
                      "the PP=1 parameters."]
    counts = ", ".join(f"{k}: {v}" for k, v in summary.counts.items())
    lines += ["", f"Totals: {counts or 'nothing run yet'}", ""]
    return "\n".join(lines)


def _fmt(x: float | None, stderr: float | None = None) -> str:
    if x is None:
        return "—"
    s = f"{x:.3f}"
    if stderr is not None and not math.isnan(stderr):
        s += f" ± {stderr:.3f}"
    return s


def _needed(checks) -> str:
    """Questions each check needs for its effect: against the reference (two independent samples)
    and, on a layout, paired with its baseline on the same questions; "—" where not known."""
    cells = [f"{c.metric.split('.', 1)[-1]} {c.needed_n or '—'} / {c.paired.needed_n if c.paired else '—'}"
             for c in checks if c.needed_n is not None or c.paired is not None]
    return ", ".join(cells) or "—"


def accuracy_md(summary: RunSummary) -> str:
    lines = [
        f"# Accuracy — {summary.matrix}",
        "",
        "gsm8k exact_match through lm-eval `local-completions` (stderr is lm-eval's bootstrap/binomial).",
        "",
        "| scenario | strict-match | flexible-extract | n | seconds | smoke | parity | n needed (unpaired / paired) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.scenarios:
        g = r.gsm8k
        smoke = "—" if r.smoke is None else ("ok" if all(p.ok for p in r.smoke.prompts) else "FAIL")
        parity = "—"
        if r.smoke and r.smoke.parity:
            parity = "ok" if r.smoke.parity.ok else "MISMATCH"
        elif r.smoke and r.tp * r.pp > 1:
            parity = "no baseline"
        if g is None:
            acc = [r.gsm8k_error and "not run: " + r.gsm8k_error.replace("|", "\\|") or "—", "—", "—", "—"]
        else:
            acc = [_fmt(g.strict, g.strict_stderr), _fmt(g.flexible, g.flexible_stderr), str(g.n), f"{g.seconds:.0f}"]
        lines.append(f"| {r.id} | " + " | ".join([*acc, smoke, parity, _needed(r.accuracy), r.verdict]) + " |")
    checks = [(r.id, c) for r in summary.scenarios for c in r.accuracy]
    if checks:
        lines += ["", "## Accuracy checks (one-sided test against the reference; threshold, MDE, p-value; a layout's "
                      "paired test against its baseline; \"not comparable\": measured under another protocol)", ""]
        lines += [f"- {rid}: {c.summary()}" + (f"; Wilson low {c.wilson_low:.4f}" if c.wilson_low is not None else "")
                  for rid, c in checks]
    lines.append("")
    return "\n".join(lines)
