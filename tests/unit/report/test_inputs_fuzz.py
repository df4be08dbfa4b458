"""Property: whatever a summary.json, a history database row or a waiver's `until:` is turned into,
the commands that read them (`gate`, `gate --baseline`, `diff`, `reference record`, `history`,
`gate --history`, `waivers --history`, `validate`) exit 0, 1 or 2 as the README says — 2 with ONE
line starting "error:", never a traceback or an "internal error" —, print nothing a terminal would
obey (no raw ESC, BEL or carriage return from the data) and no line longer than the printers'
bound, and change nothing on disk except what `reference record` is asked to write.

Mutations of a summary: any node of its JSON replaced by a value of another type or an absurd one
(NaN, inf, a 400-digit number, a long or control-character string, null, a list or an object), a
key dropped or added, and raw byte damage of the file. Mutations of a history database: any column
of a results or runs row given another type (SQLite keeps what it is given). `until:`: dates,
releases, text and numbers of every shape, written in a matrix and in a summary; there the gate's
exit is 2 exactly when versions.parse_until refuses the text (never "expired", exit 1, for a typo).

Derandomized with bounded examples: the same cases every run, each test well under 20 s."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servematrix import redact
from servematrix.cli import main
from servematrix.record import (CheckResult, Failure, Gsm8kResult, LoadResult, MetricValue, Protocol, RunSummary,
                                ScenarioRecord)
from servematrix.report import history
from servematrix.versions import VersionError, parse_until

# SERVEMATRIX_FUZZ_EXAMPLES raises the count for a longer hunt by hand; CI runs the default
FUZZ = settings(max_examples=int(os.environ.get("SERVEMATRIX_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=os.environ.get("SERVEMATRIX_FUZZ_RANDOM") is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LINE_BOUND = 2_500  # the printers cut a value at 2,000 characters; a line holds a few around it
UNOBEYED = ("\x1b", "\x07", "\r", "\x9b")  # what a terminal would act on


# --- a valid run to start from -------------------------------------------------------------------
PROTOCOL = Protocol(dataset="d" * 16, question_ids="0-23", n=24, fewshot_ids=["a"], template="t" * 16,
                    max_gen_toks=256, seed=0, servematrix="0.1.0")


def _records() -> list[ScenarioRecord]:
    check = CheckResult(metric="gsm8k.nll", status="pass", effect=0.1, alpha=0.05, beta=0.2, measured=1.5, n=24,
                        reference=1.5, reference_n=24, threshold=1.6, mde=0.1, p_value=0.5, sigma=0.5)
    common = dict(scenario="a", model="m", pp=1, quant="fp32", vllm="current", device="cpu", started_at="t",
                  seconds=1.0)
    gsm8k = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=24, seconds=1.0,
                        protocol=PROTOCOL)
    return [
        ScenarioRecord(id="a/tp1-pp1-fp32", tp=1, expect={"expect": "pass"}, verdict="pass",
                       load=LoadResult(ok=True), gsm8k=gsm8k, accuracy=[check],
                       metrics={"gsm8k.nll": MetricValue(mean=1.5, sigma=0.5, stderr=0.1, n=24)}, **common),
        ScenarioRecord(id="a/tp2-pp1-fp32", tp=2, verdict="xfail", load=LoadResult(ok=False),
                       expect={"expect": "xfail", "reason": "r", "bug": "https://x/y", "until": "2099-01-01"},
                       failure=Failure.of("exception", "KeyError: 'k_scale'"), **common),
        ScenarioRecord(id="a/tp4-pp1-fp32", tp=4, expect={"expect": "pass"}, verdict="skipped",
                       note="needs 4 GPUs", **common),
    ]


def summary(run_dir: str) -> dict:
    records = _records()
    s = RunSummary(matrix="m", run_dir=run_dir, host="h", vllm_version="0.32.0", torch_version="t",
                   servematrix_version="0", started_at="2026-01-01T00:00:00", ended_at="t", status="complete",
                   selected=[r.id for r in records], scenarios=records, exit_code=0)
    return json.loads(s.model_dump_json())


# --- mutations ------------------------------------------------------------------------------------
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.just(10**400), st.floats(allow_nan=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=40), st.sampled_from(["", "x" * 5000, "a/\x1b[2J\x1b]0;t\x07\nverdict: SHIP\r", "\u202e",
                                           "9" * 5000, "cpu-0." + "9" * 5000, "pass", "fail", "xpass", "nan"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, at=()):
    """Every location in a JSON tree (dict keys and list indices), the root excluded."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield at + (k,)
            yield from _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield at + (i,)
            yield from _paths(v, at + (i,))


@st.composite
def mutated_summary(draw) -> bytes:
    data = summary("RUN")
    kind = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "bytes"]))
    if kind == "bytes":
        raw = json.dumps(data).encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(max_size=6)) + raw[at + draw(st.integers(0, 8)):]
    paths = sorted(_paths(data), key=str)
    where = draw(st.sampled_from(paths))
    parent = data
    for p in where[:-1]:
        parent = parent[p]
    if kind == "replace":
        parent[where[-1]] = draw(ODD)
    elif kind == "drop" and isinstance(parent, dict):
        del parent[where[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(ODD)
    return json.dumps(data, allow_nan=True).replace('"RUN"', '"r"').encode()


# --- running a command and what must hold -------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], codes: set[int]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    out, err = out.getvalue(), err.getvalue()
    assert rc in codes, (argv, rc, out, err)
    assert "Traceback" not in out + err and "internal error" not in err, (argv, err)
    if rc == 2 and err:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    for text in (out, err):
        assert not any(c in text for c in UNOBEYED), (argv, text[:500])
        assert max([len(x) for x in text.splitlines()] + [0]) <= LINE_BOUND, (argv, "a line is unbounded")
    return rc, out, err


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"SERVEMATRIX_CACHE": f"{tmp}/cache"}):
        old = os.getcwd()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)
            redact.forget()


def _write_run(root: Path, name: str, raw: bytes) -> None:
    (root / name).mkdir()
    (root / name / "summary.json").write_bytes(raw)


# --- summaries -------------------------------------------------------------------------------------
@FUZZ
@given(raw=mutated_summary())
def test_a_mutated_summary_is_judged_or_refused_in_one_line_by_every_reader(raw):
    with workdir() as root:
        _write_run(root, "r", raw)
        _write_run(root, "ok", json.dumps(summary("ok")).encode())
        (root / "refs.yaml").write_text("# notes\nreferences: []\n")
        before = _tree(root)
        for argv in (["gate", "r"], ["gate", "ok", "--baseline", "r"], ["diff", "ok", "r"], ["diff", "r", "ok"]):
            run(argv, {0, 1, 2})
        assert _tree(root) == before  # the readers wrote nothing
        rc, _, _ = run(["reference", "record", "r", "--out", "refs.yaml"], {0, 1, 2})
        if rc != 0:  # refused, or nothing to record: the references file is as it was
            assert _tree(root) == before


# --- history rows ------------------------------------------------------------------------------------
COLUMNS = {"results": history.RESULT_COLUMNS,
           "runs": ("run_dir", "matrix", "started_at", "ended_at", "status", "exit_code", "vllm", "torch", "host")}
SQL_ODD = st.one_of(ODD.filter(lambda v: not isinstance(v, (list, dict)) and not (isinstance(v, int) and
                                                                               abs(v) >= 2**63)),
                    st.binary(max_size=8),
                    st.sampled_from(['{"m": {"mean": 1e999}}', '{"m": {"mean": ' + "9" * 400 + "}}", "[1]", "{}",
                                     '[{"name": 1, "status": null}]', '{"m": {"mean": "x"}}', "not json",
                                     '{"\\u001b[31m": {"mean": 1}}']))


@FUZZ
@given(table=st.sampled_from(sorted(COLUMNS)), data=st.data())
def test_a_history_row_of_any_type_is_read_or_refused_in_one_line(table, data):
    column = data.draw(st.sampled_from(COLUMNS[table]))
    value = data.draw(SQL_ODD)
    with workdir() as root:
        _write_run(root, "r", json.dumps(summary(str(root / "r"))).encode())
        db = root / "h.sqlite"
        history.append(RunSummary.model_validate(summary(str(root / "r"))), db)
        con = sqlite3.connect(db)
        con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = (SELECT min(rowid) FROM {table})", (value,))
        con.commit()
        con.close()
        (root / "m.yaml").write_text("name: m\nscenario_dir: s\nscenarios: []\n")
        before = _tree(root)
        run(["history", "--db", "h.sqlite"], {0, 2})
        run(["gate", "r", "--history", "3", "--db", "h.sqlite"], {0, 1, 2})
        run(["waivers", "m.yaml", "--history", "h.sqlite"], {0, 2})
        assert _tree(root) == before  # read-only


# --- waiver `until:` ---------------------------------------------------------------------------------
UNTIL = st.one_of(
    st.dates().map(str), st.text(max_size=30),
    st.from_regex(r"[a-z]{1,5}-[0-9]{1,12}(\.[0-9]{1,12}){0,4}", fullmatch=True),
    st.from_regex(r"[0-9]{1,5}-[0-9]{1,3}-[0-9]{1,3}", fullmatch=True),
    st.sampled_from(["cpu-0." + "9" * 5000, "9" * 5000, "cpu-0.40.0", "cpu-0.1.0", "2000-01-01", "2999-12-31",
                     "2027-02-30", "0000-01-01", "cpu-0.x", "CPU-0.1.0", "cuda-1.0", "\x1b[31m", ""]),
)


@FUZZ
@given(until=UNTIL)
def test_an_until_in_a_summary_is_refused_exactly_when_it_cannot_be_read_never_judged_expired(until):
    try:
        parse_until(until)
        readable = True
    except VersionError:
        readable = False
    data = summary("r")
    data["scenarios"][1]["expect"]["until"] = until
    with workdir() as root:
        _write_run(root, "r", json.dumps(data).encode())
        rc, out, _ = run(["gate", "r", "--fail-on-stale-waivers"], {0, 1, 2})
        assert (rc == 2) == (not readable), (until, rc, out)


@FUZZ
@given(until=UNTIL, quoted=st.booleans())
def test_an_until_in_a_matrix_is_validated_or_refused_at_its_line(until, quoted):
    scenario = ("name: a\nmodel: {path: /x}\nquants: {fp32: {}}\nsmoke: {prompts: [{name: p, prompt: hi}]}\n")
    value = json.dumps(until) if quoted else until
    with workdir() as root:
        (root / "scenarios").mkdir()
        (root / "scenarios" / "a.yaml").write_text(scenario)
        (root / "matrix").mkdir()
        (root / "matrix" / "w.yaml").write_text(
            "name: w\ninclude:\n  - scenario: a\n    expect: xfail\n    reason: r\n    bug: https://x/y\n"
            f"    until: {value}\n")
        for cmd in ("validate", "waivers"):
            rc, _, err = run([cmd, "matrix/w.yaml"], {0, 2})
            if rc == 2:
                assert err.startswith("error: matrix/w.yaml"), err


def test_the_starting_summary_is_valid_and_ships():
    # the mutations start from a run the gate judges (SHIP), so a refusal is the mutation's doing
    with workdir() as root:
        _write_run(root, "r", json.dumps(summary("r")).encode())
        assert run(["gate", "r"], {0})[0] == 0
        data = copy.deepcopy(summary("r"))
        assert data["scenarios"][1]["expect"]["until"] == "2099-01-01"
