"""Trend charts: one inline SVG per scenario and metric over the history — each run's measured
mean (a dot coloured by the run's verdict, its value and date in a <title> tooltip), the reference
(dashed line) and the band between it and the check's threshold (shaded: results in it still
pass; the threshold is the red line). Drawn here as plain SVG: no network, no JavaScript, so the
page renders from a CI artifact as it is.

The reference and threshold of each run are the ones its own check used (kept in the history's
accuracy column), else the current run's; a metric no check guards is drawn without a band.

A number measured under another protocol (question set, n, prompt, generation settings...: the
fingerprint of record_gsm8k.Protocol) measures something else, so each protocol is its own series:
its own line and colour, labelled in a legend by its n (and fingerprint where two share an n), and
no line — measured, reference or threshold — ever joins points of two protocols. The history keeps
no fingerprint, so a run's is read from its summary.json; where that is gone (or predates
fingerprints) the run's n stands for its protocol."""

from __future__ import annotations

import functools
import hashlib
import html
import json
import math
from pathlib import Path

from pydantic import ValidationError

from servematrix.record import METRICS, CheckResult, Protocol
from servematrix.report import jsonio

W, H = 380, 150  # the chart's size in CSS pixels (a legend adds LEGEND_LINE per protocol)
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 22, 26  # margins: y labels left, dates under
LEGEND_LINE = 12
BAND = "#d5ecd6"  # solid (no opacity): the lines over it stay crisp, and a test can find it on a screenshot
VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "xfail": "#ef6c00", "xpass": "#6a1b9a",
                   "error": "#616161", "skipped": "#9e9e9e"}
# one line colour per protocol, in order of first appearance (the first is the single-protocol blue)
PROTOCOL_COLOURS = ("#1565c0", "#00838f", "#8e24aa", "#f57f17", "#5d4037")


def _e(x) -> str:
    return html.escape(str(x))


def series(rows: list[dict], metric: str, current: CheckResult | None = None,
           scenario: str | None = None) -> list[dict]:
    """The chart's points: per history row that measured `metric`, its mean, n, verdict, date, the
    reference/threshold its check used (or the current check's) and the protocol it was measured
    under (None where unknown; only looked up when `scenario` names the record)."""
    out = []
    for row in rows:
        m = row.get("metrics", {}).get(metric)
        if m is None or not _finite(m.get("mean")):
            continue
        check = next((c for c in row.get("accuracy", []) if c.get("metric") == metric), None) or {}
        ref = check.get("reference", current.reference if current else None)
        thr = check.get("threshold", current.threshold if current else None)
        out.append({"mean": m["mean"], "n": m.get("n"), "verdict": row.get("verdict", ""),
                    "at": str(row.get("started_at", "")), "reference": ref if _finite(ref) else None,
                    "threshold": thr if _finite(thr) else None,
                    "protocol": fingerprint(row.get("run_dir"), scenario)})
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- protocols: which points belong to one series --------------------------------------------------
def fingerprint(run_dir: str | None, scenario: str | None) -> Protocol | None:
    """The protocol the run's record of `scenario` was measured with, from the run's summary.json;
    None where the run directory is gone, unreadable, or its record has no fingerprint."""
    if not run_dir or not scenario:
        return None
    path = Path(run_dir) / "summary.json"
    try:
        st = path.stat()
    except OSError:
        return None
    return _fingerprints(str(path), st.st_mtime_ns, st.st_size).get(scenario)


@functools.lru_cache(maxsize=64)
def _fingerprints(path: str, mtime_ns: int, size: int) -> dict[str, Protocol | None]:
    """Each record's fingerprint in one summary.json; cached by the file's state, since every
    scenario's charts on every page look up the same few runs."""
    try:
        data = jsonio.loads(jsonio.read_text(Path(path)))
    except (OSError, ValueError):
        return {}
    out: dict[str, Protocol | None] = {}
    for rec in data.get("scenarios", []) if isinstance(data, dict) else []:
        g = rec.get("gsm8k") if isinstance(rec, dict) else None
        raw = g.get("protocol") if isinstance(g, dict) else None
        try:
            out[str(rec.get("id"))] = Protocol.model_validate(raw) if raw else None
        except ValidationError:  # a record this code did not write: treated as no fingerprint
            out[str(rec.get("id"))] = None
    return out


def _digest(p: Protocol) -> str:
    return hashlib.sha256(p.model_dump_json().encode()).hexdigest()[:8]


def protocol_keys(points: list[dict]) -> list[str]:
    """Each point's protocol: its fingerprint where known, else its n. A point without a fingerprint
    joins the one fingerprinted protocol of its n, if there is exactly one (compared as before,
    like a reference written before fingerprints); else it stays apart, under its n."""
    known: dict[object, set[str]] = {}
    for p in points:
        if p["protocol"] is not None:
            known.setdefault(p["n"], set()).add(_digest(p["protocol"]))
    keys = []
    for p in points:
        if p["protocol"] is not None:
            keys.append(_digest(p["protocol"]))
        else:
            same_n = known.get(p["n"], set())
            keys.append(next(iter(same_n)) if len(same_n) == 1 else f"n={p['n']}")
    return keys


def groups(points: list[dict]) -> list[dict]:
    """The chart's series, one per protocol in order of first appearance: key, label, colour, the
    indices of its points, and (its <title>) what it measured differently from the series before."""
    keys = protocol_keys(points)
    out: list[dict] = []
    for i, k in enumerate(keys):
        g = next((g for g in out if g["key"] == k), None)
        if g is None:
            g = {"key": k, "idx": [], "colour": PROTOCOL_COLOURS[len(out) % len(PROTOCOL_COLOURS)], "protocol": None}
            out.append(g)
        g["idx"].append(i)
        g["protocol"] = g["protocol"] or points[i]["protocol"]
    labels = [f"n={points[g['idx'][0]]['n'] if points[g['idx'][0]]['n'] is not None else '?'}" for g in out]
    for g, label in zip(out, labels):  # two protocols of one n are told apart by their fingerprints
        twin = labels.count(label) > 1
        g["label"] = label + (f" · {g['key'][:6] if g['protocol'] else 'no fingerprint'}" if twin else "")
    for before, g in zip(out, out[1:]):
        a, b = before["protocol"], g["protocol"]
        g["differs"] = "; ".join(a.differences(b)) if a and b else f"{before['label']} → {g['label']}"
    if out:
        out[0]["differs"] = ""
    return out


def segments(keys: list[str]) -> list[list[int]]:
    """Runs of consecutive points under one protocol: a reference or threshold line and its band
    never cross a protocol change."""
    out: list[list[int]] = []
    for i, k in enumerate(keys):
        if out and keys[out[-1][-1]] == k:
            out[-1].append(i)
        else:
            out.append([i])
    return out


# --- drawing -----------------------------------------------------------------------------------------
def chart(metric: str, points: list[dict], chart_id: str = "") -> str:
    """An SVG line chart of `points` (from `series`); '' when there is nothing to draw."""
    if not points:
        return ""
    series_ = groups(points)
    keys = protocol_keys(points)
    legend = LEGEND_LINE * len(series_) if len(series_) > 1 else 0
    top, height = TOP + legend, H + legend
    values = [p["mean"] for p in points] + [p[k] for p in points for k in ("reference", "threshold") if p[k] is not None]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.1, 0.05)  # a flat series still gets a visible range
    lo, hi = lo - pad, hi + pad
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    step = pw / (len(points) - 1) if len(points) > 1 else pw

    def x(i: int) -> float:
        return LEFT + (pw / 2 if len(points) == 1 else i * step)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    def span(i: int) -> tuple[float, float]:  # a lone guarded run's level lines: the plot, or its own slot
        if len(series_) == 1:
            return LEFT, W - RIGHT
        return max(LEFT, x(i) - step / 2), min(W - RIGHT, x(i) + step / 2)

    parts = [f'<rect x="{LEFT}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    last = None
    for seg in segments(keys):
        guarded = [i for i in seg if points[i]["reference"] is not None and points[i]["threshold"] is not None]
        if guarded:
            parts += _guard(points, guarded, x, y, span, keys[seg[0]])
            last = points[guarded[-1]]
    if last is not None:
        up = 1 if last["threshold"] > last["reference"] else -1  # each label on its line's outer side
        for key, colour, dy in (("reference", "#37474f", 11 if up > 0 else -3),
                                ("threshold", "#c62828", -3 if up > 0 else 11)):
            name = "ref" if key == "reference" else key
            parts.append(f'<text x="{W - RIGHT - 2}" y="{y(last[key]) + dy:.1f}" font-size="10" text-anchor="end" '
                         f'fill="{colour}">{name} {last[key]:.4g}</text>')
    for a, b in zip(segments(keys), segments(keys)[1:]):  # where the protocol changed
        g = next(g for g in series_ if g["key"] == keys[b[0]])
        cx = (x(a[-1]) + x(b[0])) / 2
        parts.append(f'<line class="protocol-change" x1="{cx:.1f}" y1="{top}" x2="{cx:.1f}" y2="{top + ph}" '
                     f'stroke="#757575" stroke-dasharray="2,2"><title>protocol changed: {_e(g["differs"])}</title>'
                     "</line>")
    for g in series_:
        line = " ".join(f"{x(i):.1f},{y(points[i]['mean']):.1f}" for i in g["idx"])
        parts.append(f'<polyline class="measured" data-protocol="{_e(g["label"])}" fill="none" stroke="{g["colour"]}" '
                     f'stroke-width="2" points="{line}"/>')
    label = {i: g["label"] for g in series_ for i in g["idx"]}
    for i, p in enumerate(points):
        colour = VERDICT_COLOURS.get(p["verdict"], "#000")
        parts.append(f'<circle class="run" data-verdict="{_e(p["verdict"])}" data-protocol="{_e(label[i])}" '
                     f'cx="{x(i):.1f}" cy="{y(p["mean"]):.1f}" r="4.5" fill="{colour}"><title>{_e(p["at"])}: '
                     f'{p["mean"]:.4f} ({_e(p["verdict"])}) · {_e(label[i])}</title></circle>')
    parts += _axes(points, lo, hi, pad, x, y, height)
    if legend:
        parts += _legend(series_)
    better = "higher" if METRICS.get(metric, True) else "lower"
    title = f"{metric} ({better} is better) · {len(points)} run{'s' if len(points) != 1 else ''}"
    parts.append(f'<text x="{LEFT}" y="14" font-size="11" font-weight="600">{_e(title)}</text>')
    title += f" · {len(series_)} protocols" if len(series_) > 1 else ""  # the legend shows them; the tooltip says it
    ident = f' id="{_e(chart_id)}"' if chart_id else ""
    return (f'<svg class="trend-chart"{ident} data-metric="{_e(metric)}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{W}" height="{height}" viewBox="0 0 {W} {height}" role="img"><title>{_e(title)}</title>'
            + "".join(parts) + "</svg>")


def _guard(points, idx, x, y, span, protocol: str) -> list[str]:
    """One protocol segment's band, threshold and reference (the runs' own values, as steps)."""
    if len(idx) == 1:
        xs = list(span(idx[0]))
        ref, thr = [points[idx[0]]["reference"]] * 2, [points[idx[0]]["threshold"]] * 2
    else:
        xs = [x(i) for i in idx]
        ref, thr = [points[i]["reference"] for i in idx], [points[i]["threshold"] for i in idx]
    upper = [f"{a:.1f},{y(v):.1f}" for a, v in zip(xs, ref)]
    lower = [f"{a:.1f},{y(v):.1f}" for a, v in zip(reversed(xs), reversed(thr))]
    out = [f'<polygon class="band" data-protocol-key="{_e(protocol)}" fill="{BAND}" stroke="none" '
           f'points="{" ".join(upper + lower)}"/>']
    for key, values, style in (("threshold", thr, 'stroke="#c62828" stroke-width="1.5"'),
                               ("reference", ref, 'stroke="#37474f" stroke-width="1.5" stroke-dasharray="5,3"')):
        line = " ".join(f"{a:.1f},{y(v):.1f}" for a, v in zip(xs, values))
        out.append(f'<polyline class="{key}" data-protocol-key="{_e(protocol)}" fill="none" {style} points="{line}"/>')
    return out


def _axes(points, lo, hi, pad, x, y, height) -> list[str]:
    out = [f'<text x="{LEFT - 4}" y="{y(v) + 3:.1f}" font-size="10" text-anchor="end">{v:.4g}</text>'
           for v in (lo + pad, hi - pad)]  # the data's own range, not the padded one
    ends = [(0, "middle")] if len(points) == 1 else [(0, "start"), (len(points) - 1, "end")]
    for i, anchor in ends:  # first and last run's date and time (each dot's <title> has its own)
        out.append(f'<text x="{x(i):.1f}" y="{height - 8}" font-size="10" text-anchor="{anchor}">'
                   f'{_e(points[i]["at"][:16].replace("T", " "))}</text>')
    return out


def _legend(series_: list[dict]) -> list[str]:
    """A line per protocol under the title: its colour, label and runs; its <title> says what it
    measured differently from the one before."""
    out = []
    for k, g in enumerate(series_):
        runs = len(g["idx"])
        tip = f"<title>{_e(g['differs'])}</title>" if g["differs"] else ""
        out.append(f'<text class="protocol" data-protocol="{_e(g["label"])}" x="{LEFT}" '
                   f'y="{TOP + LEGEND_LINE * k + 4}" font-size="10" fill="{g["colour"]}">{tip}'
                   f'━ {_e(g["label"])} ({runs} run{"s" if runs != 1 else ""})'
                   f'{" — " + _e(_clip(g["differs"])) if g["differs"] else ""}</text>')
    return out


def _clip(text: str, most: int = 44) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"  # the whole of it is in the <title>


def charts(rows: list[dict], current: list[CheckResult] | None = None, prefix: str = "",
           scenario: str | None = None) -> str:
    """Every metric's chart for one scenario's history rows (metrics in name order); `scenario`
    names its records, so each run's protocol can be looked up."""
    checks = {c.metric: c for c in current or []}
    metrics = sorted({m for row in rows for m in row.get("metrics", {})})
    out = [chart(m, series(rows, m, checks.get(m), scenario), f"{prefix}{m}" if prefix else "") for m in metrics]
    return "".join(c for c in out if c)
