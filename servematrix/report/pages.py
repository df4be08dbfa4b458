"""A page per scenario (scenario-<id>.html beside report.html): its verdict and expectation, the
fix reports, every smoke prompt's output, the parity table against its baseline, accuracy checks,
its trend charts, and the lines of its server log around the failure. Self-contained like
report.html (no network, no JavaScript)."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from servematrix.record import RunSummary, ScenarioRecord
from servematrix.report import trends
from servematrix.files import atomic_write, page_name
from servematrix.serve.failure import http_status, is_problem, logged_at, shutting_down

CONTEXT = 12  # log lines shown either side of the failure's line
TAIL = 40  # log lines shown when the signature is not found in the log
MAX_LOG_BYTES = 4 << 20  # read at most the last 4 MiB of a log: a page, not an archive
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:5px 9px;font-size:13px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
pre.log{background:#1e1e1e;color:#ddd;padding:10px;font-size:12px;overflow-x:auto;line-height:1.35}
pre.log span{display:block}
pre.log .hit{background:#b71c1c;color:#fff}
.verdict{color:#fff;padding:2px 8px;border-radius:3px;font-weight:600}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}
"""


def _e(x) -> str:
    return html.escape(str(x))


def log_excerpt(run_dir: Path, r: ScenarioRecord) -> tuple[str, list[tuple[int, str, bool]]]:
    """(log file name, [(line number, text, is the failure line)]) around the failure: the first
    line holding the signature (server.log, or lm_eval.log for a gsm8k failure) — or, since a
    signature is often `Type: message` built from a traceback whose lines hold the two apart, its
    message — else the log's tail. An accuracy failure's server did not die: its tail is the
    shutdown, so it gets the lines around the first error or warning while lm-eval ran (see
    `evaluation`), or none. Empty when there is no failure or no log."""
    if r.failure is None:
        return "", []
    if r.failure.phase == "accuracy":
        ev = evaluation(run_dir, r)
        return ("", []) if ev is None else (ev.name, ev.lines)
    base = Path(run_dir) / r.id
    candidates = [base / "gsm8k" / "lm_eval.log"] if r.failure.phase == "gsm8k" else []
    for path in candidates + [base / "server.log"]:
        if path.is_file():
            first, lines = _lines(path)
            hit = _find(lines, r.failure.signature)
            if hit is not None:
                return path.name, _around(first, lines, hit)
            lo = max(0, len(lines) - TAIL)
            return path.name, [(first + i, lines[i], False) for i in range(lo, len(lines))]
    return "", []


def _lines(path: Path) -> tuple[int, list[str]]:
    """The log's (last MAX_LOG_BYTES of) lines and the first one's number."""
    first, text = _tail(path)
    # "\n" alone ends a line; a progress bar's "\r" redraws it: what a terminal shows is the last redraw
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return first, lines


def _around(first: int, lines: list[str], hit: int) -> list[tuple[int, str, bool]]:
    lo, hi = max(0, hit - CONTEXT), min(len(lines), hit + CONTEXT + 1)
    return [(first + i, lines[i], i == hit) for i in range(lo, hi)]


class Evaluation(BaseModel):
    """server.log while lm-eval ran: where (line numbers), when (lm-eval's first and last
    timestamps; None where its log has none), how the server answered, and the lines around its
    first error, warning or refused request in that window (empty: there was none)."""

    name: str = "server.log"
    first: int
    last: int
    since: str | None = None
    until: str | None = None
    answered: int = 0  # HTTP responses < 400
    refused: int = 0  # HTTP responses >= 400
    lines: list[tuple[int, str, bool]] = Field(default_factory=list)


def evaluation(run_dir: Path, r: ScenarioRecord) -> Evaluation | None:
    """The evaluation window of server.log: from lm-eval's first timestamp to its last, and never
    past the server's shutdown (its teardown warnings say nothing of the answers); the whole log
    before the shutdown where lm-eval's log gives no time. None without a server log."""
    path = Path(run_dir) / r.id / "server.log"
    if not path.is_file():
        return None
    first, lines = _lines(path)
    lm_eval = Path(run_dir) / r.id / "gsm8k" / "lm_eval.log"
    stamps = [t for t in map(logged_at, _lines(lm_eval)[1] if lm_eval.is_file() else []) if t]
    since, until = (stamps[0], stamps[-1]) if stamps else (None, None)
    start, end = _window(lines, since, until)
    if start == end and since is not None:  # lm-eval's clock matches no line here (another time zone?)
        since = until = None
        start, end = _window(lines, None, None)
    window = range(start, end)
    codes = [c for c in map(http_status, (lines[i] for i in window)) if c is not None]
    hit = next((i for i in window if is_problem(lines[i]) or (http_status(lines[i]) or 0) >= 400), None)
    return Evaluation(first=first + start, last=first + end - 1, since=since, until=until,
                      answered=sum(c < 400 for c in codes), refused=sum(c >= 400 for c in codes),
                      lines=[] if hit is None else _around(first, lines, hit))


def _window(lines: list[str], since: str | None, until: str | None) -> tuple[int, int]:
    """[start, end) of the lines logged from `since` to `until` ("MM-DD HH:MM:SS"; None: unbounded)
    and before the shutdown."""
    start, stamp = None, None
    for i, line in enumerate(lines):
        stamp = logged_at(line) or stamp  # an access line has no time: the line before it gives it
        if shutting_down(line) or (until and stamp and stamp > until):
            return (i if start is None else start), i
        if start is None and (since is None or (stamp is not None and stamp >= since)):
            start = i
    return (len(lines) if start is None else start), len(lines)


def _find(lines: list[str], signature: str) -> int | None:
    sig = signature.strip()
    needles = [sig[:80]] + ([sig.split(": ", 1)[1][:80]] if ": " in sig else [])
    for needle in (n for n in needles if len(n) >= 8):  # a shorter one would hit anywhere
        hit = next((i for i, line in enumerate(lines) if needle in line), None)
        if hit is not None:
            return hit
    return None


def _tail(path: Path) -> tuple[int, str]:
    """The log's last MAX_LOG_BYTES from a line start, and that line's number (1-based)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = max(0, size - MAX_LOG_BYTES)
        f.seek(0)
        before = 0
        while f.tell() < start:  # count the skipped lines, so numbers are the file's own
            chunk = f.read(min(1 << 20, start - f.tell()))
            before += chunk.count(b"\n")
        data = f.read()
        if start and not data.startswith(b"\n"):  # drop the partial first line
            cut = data.find(b"\n")
            data = data[cut + 1:] if cut >= 0 else b""
            before += 1 if cut >= 0 else 0
        elif start:
            data, before = data[1:], before + 1
        return before + 1, data.decode("utf-8", "replace")


def _smoke(r: ScenarioRecord) -> str:
    if r.smoke is None:
        return "<p>No smoke prompts ran.</p>"
    rows = []
    for p in r.smoke.prompts:
        toks = len(p.generation.token_ids) if p.generation else "—"
        rows.append(f'<tr><td>{_e(p.name)}</td><td>{_e(p.endpoint)}</td><td class="{"ok" if p.ok else "bad"}">'
                    f'{"ok" if p.ok else "FAIL"}</td><td><pre>{_e(p.text)}</pre></td><td>{toks}</td>'
                    f'<td>{_e("; ".join(p.problems))}</td></tr>')
    err = f'<p class="bad">transport error: {_e(r.smoke.error)}</p>' if r.smoke.error else ""
    return (err + '<table id="smoke"><tr><th>prompt</th><th>endpoint</th><th>result</th><th>output</th>'
            "<th>tokens</th><th>problems</th></tr>" + "".join(rows) + "</table>")


def _parity(r: ScenarioRecord, by_id: dict[str, ScenarioRecord]) -> str:
    par = r.smoke.parity if r.smoke else (r.load_check.parity if r.load_check else None)
    if par is None:
        return "<p>No parity check (a baseline layout, or the baseline did not finish).</p>"
    base = by_id.get(par.baseline)
    ours = {p.name: p for p in r.smoke.prompts} if r.smoke else {}
    theirs = {p.name: p for p in base.smoke.prompts} if base and base.smoke else {}
    rows = []
    for name in ours or {}:
        a, b = ours[name], theirs.get(name)
        same = b is not None and a.generation and b.generation and a.generation.token_ids == b.generation.token_ids
        rows.append(f"<tr><td>{_e(name)}</td><td><pre>{_e(b.text if b else '—')}</pre></td><td><pre>{_e(a.text)}</pre>"
                    f'</td><td class="{"ok" if same else "bad"}">{"same tokens" if same else "differ"}</td></tr>')
    details = "".join(f"<li>{_e(d)}</li>" for d in par.details)
    link = f'<a href="{page_name(par.baseline)}">{_e(par.baseline)}</a>' if base else _e(par.baseline)
    return (f'<p>against {link}: <span class="{"ok" if par.ok else "bad"}">{"ok" if par.ok else "MISMATCH"}</span>'
            f"</p>{'<ul>' + details + '</ul>' if details else ''}"
            + ('<table id="parity"><tr><th>prompt</th><th>baseline output</th><th>this layout</th><th>tokens</th></tr>'
               + "".join(rows) + "</table>" if rows else ""))


def _log(run_dir: Path, r: ScenarioRecord) -> str:
    if r.failure is not None and r.failure.phase == "accuracy":
        return _why(r) + _evaluation(run_dir, r)
    name, lines = log_excerpt(run_dir, r)
    if not lines:
        return "<p>No failure, or no log.</p>" if r.failure is None or not name else "<p>The log is empty.</p>"
    return f'<p>{_e(r.id)}/{_e(name)}, lines {lines[0][0]}–{lines[-1][0]}:</p>{_pre(lines)}'


def _pre(lines: list[tuple[int, str, bool]]) -> str:
    hit_class = ' class="hit"'
    body = "".join(f'<span{hit_class if hit else ""}>{n:>6}  {_e(text)}</span>' for n, text, hit in lines)
    return f'<pre class="log" id="log">{body}</pre>'


def _why(r: ScenarioRecord) -> str:
    """An accuracy failure explained by its checks' own figures: measured against reference, n,
    threshold, MDE, p-value and the paired test, for every check that failed."""
    failed = [c for c in r.accuracy if c.status == "fail"]
    items = "".join(f"<li><code>{_e(c.summary())}</code>"
                    + (f" (reference measured over n={c.reference_n})" if c.reference_n else "") + "</li>"
                    for c in failed) or f"<li><code>{_e(r.failure.signature)}</code></li>"
    return f'<p>The server stayed up; what it answered failed these checks:</p><ul id="why">{items}</ul>'


def _evaluation(run_dir: Path, r: ScenarioRecord) -> str:
    ev = evaluation(run_dir, r)
    if ev is None:
        return "<p>No server log.</p>"
    when = (f", {ev.since}–{ev.until} by lm-eval's log" if ev.since
            else " (lm-eval's log gives no time: up to the shutdown)")
    where = (f"<p>{_e(r.id)}/{ev.name} while lm-eval ran (lines {ev.first}–{ev.last}{_e(when)}): "
             f"{ev.answered} requests answered, {ev.refused} refused (HTTP ≥ 400); ")
    if ev.last < ev.first:
        return f"<p>{_e(r.id)}/{ev.name}: no line of it was logged while lm-eval ran.</p>"
    if not ev.lines:
        return where + "no error or warning.</p>"
    hit = next(n for n, _, h in ev.lines if h)
    return where + f"its first error, warning or refused request is line {hit}:</p>{_pre(ev.lines)}"


def render(summary: RunSummary, r: ScenarioRecord, rows: list[dict] | None = None) -> str:
    from servematrix.report.html import COLOURS, accuracy_rows

    by_id = {x.id: x for x in summary.scenarios}
    exp = r.expect
    # an upstream URL is a link; servematrix's own write-up (docs/…md#…) is named, as the report has no repository to link into
    bug = f"<a href=\"{_e(exp.bug)}\">bug</a>" if (exp.bug or "").startswith("http") else f"bug: <code>{_e(exp.bug)}</code>"
    waiver = (f" · waiver: {_e(exp.reason)} ({bug}"
              f"{', until ' + _e(exp.until) if exp.until else ''})" if exp.expect == "xfail" else "")
    failure = (f"<p>failure: <b>{_e(r.failure.phase)}/{_e(r.failure.kind)}</b> <code>{_e(r.failure.signature)}</code></p>"
               if r.failure else "")
    fixes = "".join(f"<tr><td>{_e(f.name)}</td><td>{_e(f.status)}</td><td>{f.pid}</td><td>{_e(f.detail or '')}</td></tr>"
                    for f in r.fixes)
    fix_table = ('<table id="fixes"><tr><th>fix</th><th>status</th><th>pid</th><th>detail</th></tr>' + fixes
                 + "</table>") if fixes else "<p>No fix module enabled.</p>"
    runs = "".join(f'<span title="{_e(i.get("started_at"))}: {_e(i.get("verdict"))}" style="color:'
                   f'{COLOURS.get(i.get("verdict"), "#000")}">●</span>' for i in rows or [])
    charts = trends.charts(rows or [], r.accuracy, scenario=r.id) or ("<p>No metrics measured.</p>" if rows else "")
    charts = (f"<p>last {len(rows)} runs: {runs}</p>" if rows else "<p>No history yet.</p>") + charts
    acc = accuracy_rows(r)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{_e(r.id)} — servematrix</title><style>{CSS}</style></head>
<body>
<p><a href="report.html">← {_e(summary.matrix)} report</a></p>
<h1>{_e(r.id)}</h1>
<p><span class="verdict" style="background:{COLOURS.get(r.verdict, '#000')}">{_e(r.verdict)}</span>
expected {_e(exp.expect)}{waiver} · TP{r.tp}×PP{r.pp} {_e(r.quant)} · vLLM {_e(r.vllm)} {_e(r.vllm_version or '')}
· {r.seconds:.0f} s{' · ' + _e(r.note) if r.note and (exp.reason or '') not in r.note else ''}</p>
{failure}
<h2>Fix modules</h2>{fix_table}
<h2>Smoke outputs</h2>{_smoke(r)}
<h2>Parity</h2>{_parity(r, by_id)}
<h2>Accuracy</h2>{'<table id="accuracy">' + acc + '</table>' if acc else '<p>No accuracy measured.</p>'}
<h2>Trend</h2><div id="trend">{charts}</div>
<h2>Log around the failure</h2>{_log(Path(summary.run_dir), r)}
</body></html>
"""


def write_pages(summary: RunSummary, trend: dict[str, list[dict]] | None = None,
                ids: Iterable[str] | None = None) -> None:
    """Every scenario's page (or those of `ids`), beside report.html. A page shows its record and
    its baseline's, and a layout is published only once its baseline is: a new record changes its
    own page only."""
    out = Path(summary.run_dir)
    wanted = None if ids is None else set(ids)
    for r in summary.scenarios:
        if wanted is not None and r.id not in wanted:
            continue
        atomic_write(out / page_name(r.id), render(summary, r, (trend or {}).get(r.id)))
