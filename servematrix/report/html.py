"""One self-contained HTML page per run: the load-success heatmap (models down, TP×PP×quant
across), the accuracy table with thresholds, MDE and p-values, and per scenario and metric a
trend chart over the history with the reference and threshold band (report/trends.py); every
scenario id links to its own page (report/pages.py). No external assets and no JavaScript, so it
renders from a CI artifact as it is."""

from __future__ import annotations

import html

from servematrix.report import trends as charts
from servematrix.report.grid import grid
from servematrix.files import page_name
from servematrix.record import RunSummary, ScenarioRecord

COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "xfail": "#ef6c00", "xpass": "#6a1b9a",
           "error": "#616161", "skipped": "#9e9e9e", "twin-incomplete": "#1565c0"}
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:6px 10px;font-size:14px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.cell{color:#fff;font-weight:600;text-align:center;min-width:110px}
.sig{font-family:monospace;font-size:12px;color:#333}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;color:#fff;border-radius:3px}
.cell a{color:#fff;text-decoration:none}
.trend-chart{margin:4px 8px 4px 0;vertical-align:top}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _link(scenario_id: str) -> str:
    return f'<a href="{_e(page_name(scenario_id))}">{_e(scenario_id)}</a>'


def heatmap(summary: RunSummary) -> str:
    cols, rows = grid(summary)
    out = ['<table id="heatmap" class="heatmap"><tr><th>scenario</th>'
           + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"]
    for scenario, cells in rows.items():
        tds = []
        for c in cols:
            r = cells.get(c)
            if r is None:
                tds.append("<td></td>")
                continue
            sig = r.failure.signature if r.failure else ""
            kind = "load check" if r.load_check is not None else "served"  # how far the evidence went
            tds.append(f'<td class="cell" style="background:{COLOURS[r.verdict]}" title="{_e(sig)}" '
                       f'data-verdict="{r.verdict}" data-evidence="{kind}"><a href="{_e(page_name(r.id))}">'
                       f'{_e(r.verdict)}{" ᴸ" if r.load_check is not None else ""}</a></td>')
        out.append(f"<tr><th>{_e(scenario)}</th>{''.join(tds)}</tr>")
    out.append("</table>")
    return "".join(out)


def _signature(r: ScenarioRecord) -> str:
    """What a failure says: its signature; for an accuracy failure every failed check's figures
    (the signature holds the first one only)."""
    failed = [c for c in r.accuracy if c.status == "fail"] if r.failure.phase == "accuracy" else []
    return "<br>".join(_e(c.summary()) for c in failed) or _e(r.failure.signature)


def failures(summary: RunSummary) -> str:
    items = [f"<tr><td>{_link(r.id)}</td><td>{_e(r.verdict)}</td><td>{_e(r.failure.phase)}/{_e(r.failure.kind)}</td>"
             f'<td class="sig">{_signature(r)}</td><td>{_e(r.note or "")}</td></tr>'
             for r in summary.scenarios if r.failure]
    if not items:
        return "<p>No failures.</p>"
    return ("<table id=\"failures\"><tr><th>scenario</th><th>verdict</th><th>phase/kind</th><th>signature</th>"
            "<th>note</th></tr>" + "".join(items) + "</table>")


ACCURACY_HEAD = ("<tr><th>scenario</th><th>metric</th><th>measured</th><th>n</th><th>reference</th><th>threshold</th>"
                 "<th>MDE</th><th>p-value</th><th>Wilson low</th><th>paired vs baseline</th><th>result</th></tr>")


def _paired_cell(p) -> str:
    """The paired test against the baseline layout (same questions), where one ran."""
    if p is None:
        return "—"
    return (f'<span title="{_e(p.summary())}">{_e(p.test)} p={p.p_value:.3g}, '
            f'shift {p.shift:+.4g} (MDE {p.mde:.4g}): {_e(p.status)}</span>')


def accuracy_rows(r: ScenarioRecord, head: bool = True) -> str:
    """One scenario's checks and unguarded metrics as table rows ('' when it measured none)."""
    body = []
    f = lambda x, d=4: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    shown = set()
    for c in r.accuracy:
        shown.add(c.metric)
        body.append(f"<tr><td>{_link(r.id)}</td><td>{_e(c.metric)}</td><td>{f(c.measured)}</td><td>{c.n or '—'}</td>"
                    f"<td>{f(c.reference)}</td><td>{f(c.threshold)}</td><td>{f(c.mde)}</td>"
                    f"<td>{'—' if c.p_value is None else f'{c.p_value:.3g}'}</td><td>{f(c.wilson_low)}</td>"
                    f"<td>{_paired_cell(c.paired)}</td><td>{_e(c.status)}</td></tr>")
    for name, m in r.metrics.items():
        if name not in shown:
            body.append(f"<tr><td>{_link(r.id)}</td><td>{_e(name)}</td><td>{f(m.mean)}</td><td>{m.n}</td>"
                        "<td>—</td><td>—</td><td>—</td><td>—</td><td>—</td><td>—</td><td>not guarded</td></tr>")
    return (ACCURACY_HEAD if head and body else "") + "".join(body)


def accuracy(summary: RunSummary) -> str:
    body = "".join(accuracy_rows(r, head=False) for r in summary.scenarios)
    return f'<table id="accuracy">{ACCURACY_HEAD}{body}</table>' if body else "<p>No accuracy measured.</p>"


def trends(trend: dict[str, list[dict]], summary: RunSummary | None = None) -> str:
    """Per scenario: its last verdicts as coloured dots and a chart per metric (report/trends.py)."""
    if not trend:
        return "<p>No history yet.</p>"
    current = {r.id: r.accuracy for r in summary.scenarios} if summary else {}
    rows = []
    for sid, items in sorted(trend.items()):
        dots = "".join(f'<span title="{_e(i["started_at"])}: {_e(i["verdict"])}" '
                       f'style="color:{COLOURS.get(i["verdict"], "#000")}">●</span>' for i in items)
        drawn = charts.charts(items, current.get(sid), prefix=f"trend-{sid}-", scenario=sid) or "no metrics"
        rows.append(f"<tr><td>{_link(sid)}</td><td>{dots}</td><td>{drawn}</td></tr>")
    return "<table id=\"trend\"><tr><th>scenario</th><th>last verdicts</th><th>metrics (reference dashed, threshold " \
           "red, passing band shaded)</th></tr>" + "".join(rows) + "</table>"


def render(summary: RunSummary, trend: dict[str, list[dict]] | None = None) -> str:
    legend = "".join(f'<span style="background:{c}">{v}</span>' for v, c in COLOURS.items())
    counts = ", ".join(f"{k}: {v}" for k, v in summary.counts.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>servematrix — {_e(summary.matrix)}</title><style>{CSS}</style></head>
<body>
<h1>servematrix — {_e(summary.matrix)}</h1>
<p>vLLM {_e(summary.vllm_version)} · torch {_e(summary.torch_version)} · host {_e(summary.host)} ·
started {_e(summary.started_at)} · status <b>{_e(summary.status)}</b> · exit {_e(summary.exit_code)} · {_e(counts)}</p>
<h2>Load success</h2><div class="legend">{legend}</div>
{heatmap(summary)}
<h2>Failures</h2>{failures(summary)}
<h2>Accuracy</h2>{accuracy(summary)}
<h2>Trend</h2>{trends(trend or {}, summary)}
</body></html>
"""
