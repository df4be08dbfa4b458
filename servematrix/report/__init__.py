"""Report: summary.json, load-success.md, accuracy.md and junit.xml for one run directory,
rewritten atomically after every scenario so a killed run keeps what it finished; and the
`latest` link beside the run directory."""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections import defaultdict
from pathlib import Path
from xml.etree import ElementTree as ET

from servematrix.report import history
from servematrix.errors import StateError
from servematrix.record import RunSummary, ScenarioRecord
from servematrix.redact import redact_text

SYMBOL = {"pass": "✓", "fail": "✗", "xfail": "✗ (xfail)", "xpass": "✓ (xpass!)", "error": "⚠ error",
          "skipped": "–"}


def writable_target(path: Path) -> Path:
    """The file a write to `path` lands in: `path`, or the regular file a symlink there names (the
    link is kept). Anything else already there — a directory, device, FIFO, socket, a dangling
    link — is not a report of ours: StateError, nothing written."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a symlink
    except FileNotFoundError:
        if path.is_symlink():
            raise StateError(path, f"is a symlink to a missing file ({os.readlink(path)}); not written") from None
        return path
    except OSError as exc:
        raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        link = " (through a symlink)" if path.is_symlink() else ""
        raise StateError(path, f"is {_file_kind(st.st_mode)}{link}, not a regular file; not overwritten")
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file beside the target and rename it over (a reader never sees half a report),
    keeping the target's mode; a new file gets 0666 less the umask, like any other file."""
    target = writable_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # 0600
    except OSError as exc:
        raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            f.write(redact_text(text))
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
        raise


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would race the runner's threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


RUN_MARKER = "summary.json"  # a directory holding one holds a run


def check_dir(path: Path) -> None:
    """`path` is a directory this process can write in, or one it can create: not a file, not
    under a file, not in a read-only place. Nothing is created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise StateError(path, "exists and is not a directory")
        _require_writable(path)
    else:
        _require_writable(_nearest_existing(path))


def check_run_dir(out: Path, overwrite: bool = False, marker: str = RUN_MARKER) -> None:
    """Refuse, before anything is written, a run directory servematrix cannot or must not use: a
    file, a place that cannot be created or written, one that already holds a run (unless
    `overwrite`), or a `latest` beside it that is not the link servematrix keeps."""
    out = Path(out)
    if out.is_dir() and (out / marker).exists() and not overwrite:
        raise StateError(out, f"already holds a run ({marker}); nothing written: choose another --out "
                              "(run and bisect take --overwrite to write over it)")
    check_dir(out)
    if out.is_dir():
        _require_writable(out.parent)  # `latest` and history.sqlite live beside the run
    latest = out.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        raise StateError(latest, "exists and is not the symlink servematrix keeps; not replaced")


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path("/")


def _require_writable(directory: Path) -> None:
    if not directory.is_dir():
        raise StateError(directory, "is not a directory; nothing can be created under it")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StateError(directory, "is not writable")


def claim_run_dir(out: Path, overwrite: bool = False) -> None:
    """Take `out` for a run: checked (with the history beside it) before anything is written."""
    check_run_dir(out, overwrite)
    history.check(history.db_path(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(out, f"cannot be created: {exc.strerror or exc}") from exc


def write_all(summary: RunSummary, trend: dict | None = None) -> None:
    from servematrix.report import html as report_html

    out = Path(summary.run_dir)
    atomic_write(out / "summary.json", summary.model_dump_json(indent=2))
    atomic_write(out / "load-success.md", load_success_md(summary))
    atomic_write(out / "accuracy.md", accuracy_md(summary))
    atomic_write(out / "junit.xml", junit_xml(summary))
    atomic_write(out / "report.html", report_html.render(summary, trend))


def point_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


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


def _cell_sig(r: ScenarioRecord) -> str | None:
    return r.failure.signature if r.failure else None


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


def accuracy_md(summary: RunSummary) -> str:
    lines = [
        f"# Accuracy — {summary.matrix}",
        "",
        "gsm8k exact_match through lm-eval `local-completions` (stderr is lm-eval's bootstrap/binomial).",
        "",
        "| scenario | strict-match | flexible-extract | n | seconds | smoke | parity | verdict |",
        "|---|---|---|---|---|---|---|---|",
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
        lines.append(f"| {r.id} | " + " | ".join([*acc, smoke, parity, r.verdict]) + " |")
    checks = [(r.id, c) for r in summary.scenarios for c in r.accuracy]
    if checks:
        lines += ["", "## Accuracy checks (one-sided test against the reference; threshold, MDE, p-value)", ""]
        lines += [f"- {rid}: {c.summary()}" + (f"; Wilson low {c.wilson_low:.4f}" if c.wilson_low is not None else "")
                  for rid, c in checks]
    lines.append("")
    return "\n".join(lines)


def junit_xml(summary: RunSummary) -> str:
    """One testcase per scenario and check (load, smoke, parity, gsm8k) so any CI can show it."""
    suite = ET.Element("testsuite", name=f"servematrix.{summary.matrix}", timestamp=summary.started_at,
                       hostname=summary.host)
    counts = defaultdict(int)
    for r in summary.scenarios:
        for check, status, message, seconds in _checks(r):
            case = ET.SubElement(suite, "testcase", classname=r.id, name=check, time=f"{seconds or 0:.2f}")
            counts["tests"] += 1
            if status in {"failure", "error", "skipped"}:
                counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[status]] += 1
                ET.SubElement(case, status, message=message or "")
    for k in ("tests", "failures", "errors", "skipped"):
        suite.set(k, str(counts[k]))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _checks(r: ScenarioRecord):
    """(check, status, message, seconds) with status ok | failure | error | skipped."""
    if r.verdict == "xfail":
        yield "load", "skipped", f"xfail: {r.note}; got {_cell_sig(r)}", r.seconds
        return
    if r.verdict == "xpass":
        yield "load", "failure", r.note, r.seconds
    fail = r.failure
    bad = "error" if r.verdict == "error" else "failure"
    if r.load is not None:
        yield ("load", "ok" if r.load.ok else bad,
               None if r.load.ok else (fail.signature if fail else "load failed"), r.load.seconds)
    if r.smoke is not None:
        prompts_ok = all(p.ok for p in r.smoke.prompts)
        problems = "; ".join(pr for p in r.smoke.prompts for pr in p.problems) or r.smoke.error
        yield "smoke", "ok" if prompts_ok else bad, problems, None
        if r.smoke.parity is not None:
            yield "parity", "ok" if r.smoke.parity.ok else "failure", "; ".join(r.smoke.parity.details), None
    if r.gsm8k is not None:
        yield "gsm8k", "ok", None, r.gsm8k.seconds
    elif r.gsm8k_error:
        yield "gsm8k", "error" if (fail is None or fail.infra) else "failure", r.gsm8k_error, None
    if r.load is None and fail is not None:
        yield fail.phase, "error" if fail.infra else "failure", fail.signature, None
