"""Trend charts: one inline SVG per scenario and metric over the history — each run's measured
mean (a dot coloured by the run's verdict, its value and date in a <title> tooltip), the reference
(dashed line) and the band between it and the check's threshold (shaded: results in it still
pass; the threshold is the red line). Drawn here as plain SVG: no network, no JavaScript, so the
page renders from a CI artifact as it is.

The reference and threshold of each run are the ones its own check used (kept in the history's
accuracy column), else the current run's; a metric no check guards is drawn without a band."""

from __future__ import annotations

import html
import math

from servematrix.record import METRICS, CheckResult

W, H = 380, 150  # the chart's size in CSS pixels
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 22, 26  # margins: y labels left, dates under
BAND = "#d5ecd6"  # solid (no opacity): the lines over it stay crisp, and a test can find it on a screenshot
VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "xfail": "#ef6c00", "xpass": "#6a1b9a",
                   "error": "#616161", "skipped": "#9e9e9e"}


def _e(x) -> str:
    return html.escape(str(x))


def series(rows: list[dict], metric: str, current: CheckResult | None = None) -> list[dict]:
    """The chart's points: per history row that measured `metric`, its mean, verdict, date and
    the reference/threshold its check used (or the current check's)."""
    out = []
    for row in rows:
        m = row.get("metrics", {}).get(metric)
        if m is None or not _finite(m.get("mean")):
            continue
        check = next((c for c in row.get("accuracy", []) if c.get("metric") == metric), None) or {}
        ref = check.get("reference", current.reference if current else None)
        thr = check.get("threshold", current.threshold if current else None)
        out.append({"mean": m["mean"], "verdict": row.get("verdict", ""), "at": str(row.get("started_at", "")),
                    "reference": ref if _finite(ref) else None, "threshold": thr if _finite(thr) else None})
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def chart(metric: str, points: list[dict], chart_id: str = "") -> str:
    """An SVG line chart of `points` (from `series`); '' when there is nothing to draw."""
    if not points:
        return ""
    values = [p["mean"] for p in points] + [p[k] for p in points for k in ("reference", "threshold") if p[k] is not None]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.1, 0.05)  # a flat series still gets a visible range
    lo, hi = lo - pad, hi + pad
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (pw / 2 if len(points) == 1 else i * pw / (len(points) - 1))

    def y(v: float) -> float:
        return TOP + (hi - v) / (hi - lo) * ph

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    guarded = [i for i, p in enumerate(points) if p["reference"] is not None and p["threshold"] is not None]
    if guarded:
        parts.append(_band(points, guarded, x, y))
        for key, style in (("threshold", 'stroke="#c62828" stroke-width="1.5"'),
                           ("reference", 'stroke="#37474f" stroke-width="1.5" stroke-dasharray="5,3"')):
            parts.append(f'<polyline class="{key}" fill="none" {style} points="{_steps(points, guarded, key, x, y)}"/>')
        last = points[guarded[-1]]
        up = 1 if last["threshold"] > last["reference"] else -1  # each label on its line's outer side
        for key, colour, dy in (("reference", "#37474f", 11 if up > 0 else -3),
                                ("threshold", "#c62828", -3 if up > 0 else 11)):
            name = "ref" if key == "reference" else key
            parts.append(f'<text x="{W - RIGHT - 2}" y="{y(last[key]) + dy:.1f}" font-size="10" text-anchor="end" '
                         f'fill="{colour}">{name} {last[key]:.4g}</text>')
    line = " ".join(f"{x(i):.1f},{y(p['mean']):.1f}" for i, p in enumerate(points))
    parts.append(f'<polyline class="measured" fill="none" stroke="#1565c0" stroke-width="2" points="{line}"/>')
    for i, p in enumerate(points):
        colour = VERDICT_COLOURS.get(p["verdict"], "#000")
        parts.append(f'<circle class="run" data-verdict="{_e(p["verdict"])}" cx="{x(i):.1f}" cy="{y(p["mean"]):.1f}" '
                     f'r="4.5" fill="{colour}"><title>{_e(p["at"])}: {p["mean"]:.4f} ({_e(p["verdict"])})</title></circle>')
    for v in (lo + pad, hi - pad):  # the data's own range, not the padded one
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 3:.1f}" font-size="10" text-anchor="end">{v:.4g}</text>')
    ends = [(0, "middle")] if len(points) == 1 else [(0, "start"), (len(points) - 1, "end")]
    for i, anchor in ends:  # first and last run's date and time (each dot's <title> has its own)
        parts.append(f'<text x="{x(i):.1f}" y="{H - 8}" font-size="10" text-anchor="{anchor}">'
                     f'{_e(points[i]["at"][:16].replace("T", " "))}</text>')
    better = "higher" if METRICS.get(metric, True) else "lower"
    title = f"{metric} ({better} is better) · {len(points)} run{'s' if len(points) != 1 else ''}"
    parts.append(f'<text x="{LEFT}" y="14" font-size="11" font-weight="600">{_e(title)}</text>')
    ident = f' id="{_e(chart_id)}"' if chart_id else ""
    return (f'<svg class="trend-chart"{ident} data-metric="{_e(metric)}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img"><title>{_e(title)}</title>'
            + "".join(parts) + "</svg>")


def _steps(points, idx, key, x, y) -> str:
    """A per-run value (reference, threshold) as a line through the runs that had it."""
    if len(idx) == 1:  # one run: a level line across the plot
        v = y(points[idx[0]][key])
        return f"{LEFT},{v:.1f} {W - RIGHT},{v:.1f}"
    return " ".join(f"{x(i):.1f},{y(points[i][key]):.1f}" for i in idx)


def _band(points, idx, x, y) -> str:
    """The shaded region between reference and threshold (where a result still passes the check)."""
    if len(idx) == 1:
        p = points[idx[0]]
        xs = [LEFT, W - RIGHT]
        ref, thr = [p["reference"]] * 2, [p["threshold"]] * 2
    else:
        xs = [x(i) for i in idx]
        ref, thr = [points[i]["reference"] for i in idx], [points[i]["threshold"] for i in idx]
    upper = [f"{a:.1f},{y(v):.1f}" for a, v in zip(xs, ref)]
    lower = [f"{a:.1f},{y(v):.1f}" for a, v in zip(reversed(xs), reversed(thr))]
    return f'<polygon class="band" fill="{BAND}" stroke="none" points="{" ".join(upper + lower)}"/>'


def charts(rows: list[dict], current: list[CheckResult] | None = None, prefix: str = "") -> str:
    """Every metric's chart for one scenario's history rows (metrics in name order)."""
    checks = {c.metric: c for c in current or []}
    metrics = sorted({m for row in rows for m in row.get("metrics", {})})
    out = [chart(m, series(rows, m, checks.get(m)), f"{prefix}{m}" if prefix else "") for m in metrics]
    return "".join(c for c in out if c)
