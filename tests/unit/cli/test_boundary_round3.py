"""Trust at the boundary, round 3 (issue 29): the probe of the commands that are not `mirror`, kept
as cases. Each runs `servematrix.cli.main` in-process in a tmp working directory and asserts what
the README promises: exit 2 and one line naming the file, field or argument for bad input (never
an internal error), nothing on disk changed, no secret value printed or stored, output safe for a
terminal."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest

from servematrix.cli import main
from servematrix.record import CheckResult, RunSummary

from .test_boundary_cases import _never_serve, check, make_run, record, snapshot, summary_json, work  # noqa: F401

TOKEN = "hf_SuperSecret1234"  # a scenario's HF_TOKEN
KEY = "sk-flagsecret99"  # the value of its --api-key
URL_PW = "pw0rdSecret"  # the password in an xfail's bug URL

SCENARIO = """\
name: {name}
model:
  path: /nonexistent
server:
  env: {{HF_TOKEN: {token}}}
  args: [--api-key, {key}]
quants:
  fp32: {{args: [--dtype, float32]}}
smoke:
  prompts:
    - {{name: p, prompt: "hi"}}
"""


def secret_matrix(w, device: str = "cpu") -> str:
    w.file("scenarios/sec.yaml", SCENARIO.format(name="sec", token=TOKEN, key=KEY))
    return w.file("matrix/sec.yaml", textwrap.dedent(f"""\
        name: sec
        include:
          - scenario: sec
            device: {device}
            expect: xfail
            reason: "fails with token {TOKEN} and key {KEY}"
            bug: "https://alice:{URL_PW}@github.com/x/y/issues/1"
            signature: "{TOKEN}|{KEY}"
            until: cpu-0.40.0
        """))


def no_secret(text: str) -> None:
    for s in (TOKEN, KEY, URL_PW):
        assert s not in text, text


def summary_with(w, name: str, mutate) -> str:
    """A run directory holding a valid summary, changed by `mutate(data)` as another tool might."""
    d = w.root / name
    d.mkdir(parents=True)
    data = json.loads(summary_json(d, record()))
    mutate(data)
    (d / "summary.json").write_text(json.dumps(data, allow_nan=True))
    return name


def judged(data, **fields):
    """Give the summary's record a judged gsm8k.nll check (as check.accuracy.judge writes one)."""
    c = CheckResult(metric="gsm8k.nll", status="pass", effect=0.1, alpha=0.05, beta=0.2, measured=1.5, n=100,
                    reference=1.5, reference_n=100, threshold=1.6, mde=0.1, p_value=0.5, sigma=0.5)
    data["scenarios"][0]["accuracy"] = [{**c.model_dump(), **fields}]


# --- 1. secrets: a credential a user writes again in a field is masked everywhere ----------------

def test_list_and_waivers_mask_a_scenario_credential_written_in_a_reason_and_a_bug_url_password(work, capsys):
    m = secret_matrix(work)
    for argv in (["list", "-v", m], ["list", m], ["waivers", m]):
        assert main(argv) == 0
        out, err = capsys.readouterr()
        no_secret(out + err)
        assert "***" in out
    assert "https://alice:***@github.com" in out


def test_validate_of_a_dotenv_file_does_not_echo_the_token_it_holds(work, capsys):
    work.file(".env", f"HF_TOKEN={TOKEN}\n")
    check(capsys, work.tmp, ["validate", ".env"], 2, [".env:1", "HF_TOKEN=***"])


def test_a_model_path_url_is_refused_without_printing_its_password(work, capsys):
    work.file("scenarios/u.yaml", SCENARIO.format(name="u", token="t", key="k").replace(
        "path: /nonexistent", f"path: 'https://bob:{URL_PW}@example.com/models/x'"))
    work.file("matrix/u.yaml", "name: u\nscenarios: [u]\n")
    check(capsys, work.tmp, ["validate", "matrix/u.yaml"], 2, ["u.yaml:3", "model.path", "not a URL"])
    for argv in (["repro", "u/tp1-pp1-fp32", "--matrix", "matrix/u.yaml"], ["validate", "matrix/u.yaml"]):
        main(argv)
        no_secret("".join(capsys.readouterr()))


def test_debug_prints_a_redacted_traceback_and_keeps_exit_2(work, capsys):
    work.file(".env", f"HF_TOKEN={TOKEN}\n")
    assert main(["--debug", "validate", ".env"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: .env:1")
    no_secret(out + err)


def test_debug_keeps_exit_2_for_an_argument_error_and_an_internal_error(work, capsys, monkeypatch):
    assert main(["--debug", "history", "--db", "typo.sqlite"]) == 2
    from servematrix.report import gate

    def boom(path):
        raise RuntimeError(f"bug with {TOKEN} in it")

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # a secret of this process's environment
    monkeypatch.setattr(gate, "load_summary", boom)
    assert main(["--debug", "gate", "r"]) == 2  # 1 would read as a regression
    out, err = capsys.readouterr()
    assert "RuntimeError" in err and "internal error" in err
    no_secret(out + err)


# --- 2. located one-line errors instead of internal errors --------------------------------------

def test_reference_record_on_a_nan_metric_names_it_and_writes_nothing(work, capsys):
    def nan_metric(data):
        data["scenarios"][0]["metrics"]["gsm8k.nll"]["mean"] = math.nan

    run = summary_with(work, "r", nan_metric)
    work.file("refs.yaml", "# mine\nreferences: []\n")
    check(capsys, work.tmp, ["reference", "record", run, "--out", "refs.yaml"], 2,
          ["r/summary.json", "gsm8k.nll", "mean nan", "nothing written"])


def test_reference_record_on_a_summary_without_a_run_dir_names_the_field(work, capsys):
    run = summary_with(work, "r", lambda d: d.update(run_dir=""))  # relpath("") was an internal error
    work.file("refs.yaml", "references: []\n")
    check(capsys, work.tmp, ["reference", "record", run, "--out", "refs.yaml"], 2, ["r/summary.json", "run_dir"])


def test_an_unreadable_run_directory_is_one_line_for_diff_and_gate(work, capsys, monkeypatch):
    make_run(work.root, "a")
    make_run(work.root, "b")
    real = Path.is_file

    def is_file(self):  # what a directory this user may not search does (root bypasses chmod 000)
        if self.parent.name == "b":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    check(capsys, work.tmp, ["diff", "a", "b"], 2, ["b/summary.json", "cannot read", "Permission denied"])
    check(capsys, work.tmp, ["gate", "a", "--baseline", "b"], 2, ["b/summary.json", "Permission denied"])


@pytest.mark.parametrize("until, needles", [
    ("cpu-0." + "9" * 5000, ["5006 characters", "not a date or a release"]),
    ("cpu-0.1234567890.0", ["at most 9 digits"]),
    ("0000-01-01", ["year 0"]),
])
def test_an_absurd_until_is_refused_at_its_line_by_validate_and_waivers(work, capsys, until, needles):
    work.file("scenarios/a.yaml", SCENARIO.format(name="a", token="t", key="k"))
    work.file("matrix/w.yaml", "name: w\ninclude:\n  - {scenario: a, expect: xfail, reason: r, "
                               f"bug: 'https://x/y', until: {until}}}\n")
    for cmd in ("validate", "waivers"):
        check(capsys, work.tmp, [cmd, "matrix/w.yaml"], 2, ["matrix/w.yaml:3", *needles])


def test_a_summarys_unorderable_vllm_version_is_one_line_for_the_gate(work, capsys):
    def xfail_on_a_long_version(data):
        data["vllm_version"] = "1" * 5000
        data["scenarios"][0]["verdict"] = "xfail"
        data["scenarios"][0]["expect"] = {"expect": "xfail", "reason": "r", "bug": "https://x/y", "until": "cpu-0.40.0"}

    run = summary_with(work, "r", xfail_on_a_long_version)
    check(capsys, work.tmp, ["gate", run, "--fail-on-stale-waivers"], 2,
          ["summary.json", "waiver a/tp1-pp1-fp32", "not a version"])


# --- 3. exit codes -----------------------------------------------------------------------------

@pytest.mark.parametrize("until", ["garbage", "cpu-0.x", "2027-13-45", "9" * 5000])
def test_an_unparseable_until_in_a_summary_is_refused_not_judged_expired(work, capsys, until):
    def waiver(data):
        data["scenarios"][0]["verdict"] = "xfail"
        data["scenarios"][0]["expect"] = {"expect": "xfail", "reason": "r", "bug": "https://x/y", "until": until}

    run = summary_with(work, "r", waiver)
    check(capsys, work.tmp, ["gate", run, "--fail-on-stale-waivers"], 2, ["r/summary.json", "expect.until"])


def test_waivers_history_typo_and_gate_db_typo_are_refused_alike(work, capsys):
    m = secret_matrix(work)
    check(capsys, work.tmp, ["waivers", m, "--history", "histroy.sqlite"], 2, ["--history", "no such history database"])
    make_run(work.root, "r")
    check(capsys, work.tmp, ["gate", "r", "--db", "histroy.sqlite"], 2, ["--db", "no such history database"])


# --- 4. the gate does not ship on a NaN --------------------------------------------------------

@pytest.mark.parametrize("field", ["measured", "reference", "threshold"])
def test_a_check_that_passed_on_nan_is_refused_by_the_gate(work, capsys, field):
    run = summary_with(work, "r", lambda d: judged(d, **{field: math.nan}))
    check(capsys, work.tmp, ["gate", run], 2, ["r/summary.json", "accuracy[0]", f"{field} nan"])


def test_the_same_check_with_finite_numbers_still_ships(work, capsys):
    run = summary_with(work, "r", judged)
    assert main(["gate", run]) == 0, capsys.readouterr()


# --- 6. ids from files are shown, never obeyed, and bounded --------------------------------------

EVIL = "a/\x1b[2J\x1b[31mEVIL\nverdict: SHIP (exit 0)\u202e"


def evil_run(w, name: str, id_: str) -> str:
    def rename(data):
        data["scenarios"][0]["id"] = id_
        data["selected"] = [id_]

    return summary_with(w, name, rename)


@pytest.mark.parametrize("argv", [["gate", "r"], ["diff", "ok", "r"], ["diff", "r", "ok"]])
def test_escape_sequences_and_newlines_in_ids_are_printed_escaped(work, capsys, argv):
    evil_run(work, "r", EVIL)
    make_run(work.root, "ok")
    main(argv)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[2J" in out
    assert "\nverdict: SHIP (exit 0)" not in out.replace("\nverdict: SHIP (exit 0)\n", "")  # only the gate's own


def test_a_megabyte_id_does_not_pad_every_row(work, capsys):
    evil_run(work, "r", "x" * 1_000_000)
    make_run(work.root, "ok")
    for argv in (["gate", "r"], ["diff", "r", "ok"]):
        main(argv)
        out = capsys.readouterr().out
        assert len(out) < 20_000 and max(len(line) for line in out.splitlines()) < 2_500


def test_history_prints_ids_and_metric_names_from_the_database_escaped(work, capsys):
    from .test_boundary_cases import make_history

    db = make_history(work.root / "h.sqlite")
    con = sqlite3.connect(db)
    con.execute("UPDATE results SET scenario_id = ?, metrics = ?",
                (EVIL, json.dumps({"nll\x1b]0;title\x07": {"mean": 1.0}})))
    con.commit()
    con.close()
    assert main(["history", "--db", "h.sqlite"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "nll\\x1b]0;title\\x07: 1.0000" in out
    assert out.startswith("a/\\x1b[2J")


@pytest.mark.parametrize("column, value, needle", [
    ("verdict", 7, "verdict"), ("verdict", "pass\x1b]0;t\x07", "verdict"), ("scenario_id", None, "scenario_id"),
    ("signature", b"\x00", "signature"), ("fixes", '[{"": 0, "status": null}]', "a list"),
    ("accuracy", '[{"metric": 1}]', "a list"), ("metrics", '{"m": {"mean": "x"}}', "metrics"),
])
def test_a_history_row_of_another_type_is_refused_by_its_column(work, capsys, column, value, needle):
    from .test_boundary_cases import make_history

    db = make_history(work.root / "h.sqlite")
    con = sqlite3.connect(db)
    con.execute(f"UPDATE results SET {column} = ?", (value,))
    con.commit()
    con.close()
    check(capsys, work.tmp, ["history", "--db", "h.sqlite"], 2, ["h.sqlite", needle, "did not write"])


# --- 7. what is on disk is said as it is ------------------------------------------------------

@pytest.mark.parametrize("make, needle", [
    (lambda p: p.symlink_to(p.name), "symlink that loops"),
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.symlink_to("missing.yaml"), "symlink to a missing file"),
], ids=["loop", "fifo", "directory", "dangling"])
def test_a_scenario_that_is_no_file_is_said_to_be_what_it_is_not_unknown(work, capsys, make, needle):
    work.dir("scenarios")
    make(work.root / "scenarios" / "odd.yaml")
    work.file("matrix/m.yaml", "name: m\nscenarios: [odd]\n")
    check(capsys, work.tmp, ["validate", "matrix/m.yaml"], 2, ["scenarios/odd.yaml", needle])


def test_a_matrix_that_is_a_directory_or_fifo_is_said_so_and_never_read(work, capsys):
    work.dir("m.yaml")
    os.mkfifo(work.root / "f.yaml")
    check(capsys, work.tmp, ["validate", "m.yaml"], 2, ["m.yaml", "a directory"])
    check(capsys, work.tmp, ["validate", "f.yaml"], 2, ["f.yaml", "a FIFO"])  # opening it would block


def test_a_local_path_under_hf_is_told_to_be_a_path(work, capsys):
    work.file("scenarios/h.yaml", SCENARIO.format(name="h", token="t", key="k").replace(
        "path: /nonexistent", "hf: ./models/my-llama"))
    work.file("matrix/h.yaml", "name: h\nscenarios: [h]\n")
    check(capsys, work.tmp, ["validate", "matrix/h.yaml"], 2, ["h.yaml:3", "model.hf", "a local path", "`path:`"])


# --- 8. YAML 1.1 numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("value, needle", [
    ("010", "leading zero"), ("1:30", "':'"), ("0b11", "0b prefix"), ("1_0", "'_'"),
])
def test_a_yaml11_number_is_refused_not_read_as_another_number(work, capsys, value, needle):
    work.file("scenarios/a.yaml", SCENARIO.format(name="a", token="t", key="k"))
    work.file("matrix/m.yaml", f"name: m\nscenarios: [a]\naxes:\n  tp: [{value}, 2]\n")
    check(capsys, work.tmp, ["list", "matrix/m.yaml"], 2, ["matrix/m.yaml:4", repr(value), needle])


# --- 9. a comment-only references file is someone's notes --------------------------------------

def test_reference_record_keeps_the_comments_of_a_comment_only_references_file(work, capsys):
    make_run(work.root, "r")
    notes = "# my notes about these references\n# keep them\n"
    work.file("refs.yaml", notes)
    assert main(["reference", "record", "r", "--out", "refs.yaml"]) == 0, capsys.readouterr()
    text = (work.root / "refs.yaml").read_text()
    assert text.startswith(notes) and "gsm8k.nll" in text
    assert main(["reference", "record", "r", "--out", "refs.yaml"]) == 0  # again: kept, not doubled
    assert (work.root / "refs.yaml").read_text().count("# keep them") == 1


def test_summary_helpers_build_a_valid_run(work):
    # the fixtures above change one field of a summary that is otherwise valid
    run = summary_with(work, "r", judged)
    RunSummary.model_validate_json((work.root / run / "summary.json").read_text())
