"""One self-contained HTML page per run: the load-success heatmap (models down, TP×PP×quant
across), the accuracy table with thresholds, MDE and p-values, and each scenario's trend from
the history store. No external assets, so it renders from a CI artifact as it is."""

from __future__ import annotations

import html

from servematrix.report.grid import grid
from servematrix.record import RunSummary

COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "xfail": "#ef6c00", "xpass": "#6a1b9a",
           "error": "#616161", "skipped": "#9e9e9e"}
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:6px 10px;font-size:14px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.cell{color:#fff;font-weight:600;text-align:center;min-width:110px}
.sig{font-family:monospace;font-size:12px;color:#333}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;color:#fff;border-radius:3px}
"""


def _e(x) -> str:
    return html.escape(str(x))


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
                       f'data-verdict="{r.verdict}" data-evidence="{kind}">{_e(r.verdict)}'
                       f'{" ᴸ" if r.load_check is not None else ""}</td>')
        out.append(f"<tr><th>{_e(scenario)}</th>{''.join(tds)}</tr>")
    out.append("</table>")
    return "".join(out)


def failures(summary: RunSummary) -> str:
    items = [f"<tr><td>{_e(r.id)}</td><td>{_e(r.verdict)}</td><td>{_e(r.failure.phase)}/{_e(r.failure.kind)}</td>"
             f'<td class="sig">{_e(r.failure.signature)}</td><td>{_e(r.note or "")}</td></tr>'
             for r in summary.scenarios if r.failure]
    if not items:
        return "<p>No failures.</p>"
    return ("<table id=\"failures\"><tr><th>scenario</th><th>verdict</th><th>phase/kind</th><th>signature</th>"
            "<th>note</th></tr>" + "".join(items) + "</table>")


def accuracy(summary: RunSummary) -> str:
    head = ("<table id=\"accuracy\"><tr><th>scenario</th><th>metric</th><th>measured</th><th>n</th>"
            "<th>reference</th><th>threshold</th><th>MDE</th><th>p-value</th><th>Wilson low</th><th>result</th></tr>")
    body = []
    f = lambda x, d=4: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in summary.scenarios:
        shown = set()
        for c in r.accuracy:
            shown.add(c.metric)
            body.append(f"<tr><td>{_e(r.id)}</td><td>{_e(c.metric)}</td><td>{f(c.measured)}</td><td>{c.n or '—'}</td>"
                        f"<td>{f(c.reference)}</td><td>{f(c.threshold)}</td><td>{f(c.mde)}</td>"
                        f"<td>{'—' if c.p_value is None else f'{c.p_value:.3g}'}</td><td>{f(c.wilson_low)}</td>"
                        f"<td>{_e(c.status)}</td></tr>")
        for name, m in r.metrics.items():
            if name not in shown:
                body.append(f"<tr><td>{_e(r.id)}</td><td>{_e(name)}</td><td>{f(m.mean)}</td><td>{m.n}</td>"
                            "<td>—</td><td>—</td><td>—</td><td>—</td><td>—</td><td>not guarded</td></tr>")
    return head + "".join(body) + "</table>" if body else "<p>No accuracy measured.</p>"


def _spark(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = " ".join(f"{i * 100 / (len(values) - 1):.1f},{28 - (v - lo) / span * 24:.1f}" for i, v in enumerate(values))
    return f'<svg width="110" height="30" viewBox="-2 0 104 30"><polyline fill="none" stroke="#1565c0" points="{pts}"/></svg>'


def trends(trend: dict[str, list[dict]]) -> str:
    if not trend:
        return "<p>No history yet.</p>"
    rows = []
    for sid, items in sorted(trend.items()):
        dots = "".join(f'<span title="{_e(i["started_at"])}" style="color:{COLOURS.get(i["verdict"], "#000")}">●</span>'
                       for i in items)
        metrics = sorted({m for i in items for m in i["metrics"]})
        sparks = " ".join(f"{_e(m)} {_spark([i['metrics'][m]['mean'] for i in items if m in i['metrics']])}"
                          for m in metrics)
        rows.append(f"<tr><td>{_e(sid)}</td><td>{dots}</td><td>{sparks}</td></tr>")
    return "<table id=\"trend\"><tr><th>scenario</th><th>last verdicts</th><th>metrics</th></tr>" + "".join(rows) + "</table>"


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
<h2>Trend</h2>{trends(trend or {})}
</body></html>
"""
