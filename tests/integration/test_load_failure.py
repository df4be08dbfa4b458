"""A broken checkpoint on real vLLM: the server dies while loading weights, the run records the
exception line as the signature at once (not after the start-up timeout), and the verdict follows
the expectation: fail (exit 1) when it was expected to pass, xfail (exit 0) when waived."""

import json
import textwrap

import pytest

from .conftest import REPO, servematrix

pytestmark = pytest.mark.integration
SIGNATURE = "RuntimeError: start (0) + length (128) exceeds dimension size (64)."


def test_broken_checkpoint_expected_to_pass_fails_with_its_signature_and_exits_1(tmp_path, shared_cache):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(textwrap.dedent(f"""\
        name: broken-must-pass
        scenario_dir: {REPO / 'scenarios'}
        scenarios: [tiny-llama-broken]
        startup_timeout: 900
    """))
    out = tmp_path / "run"
    proc = servematrix("run", str(matrix), "--out", str(out), env={"SERVEMATRIX_CACHE": shared_cache})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (r,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert r["verdict"] == "fail"
    assert r["load"]["ok"] is False
    assert r["failure"] == {"kind": "exception", "signature": SIGNATURE, "infra": False, "phase": "load"}
    # declared dead when the process exited, far inside the 900 s start-up timeout
    assert r["load"]["seconds"] < 300
    assert SIGNATURE in (out / "load-success.md").read_text()


def test_the_shipped_broken_matrix_waives_it_as_xfail(tmp_path, shared_cache):
    out = tmp_path / "run"
    proc = servematrix("run", "matrix/broken.yaml", "--out", str(out), env={"SERVEMATRIX_CACHE": shared_cache})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert (r["verdict"], r["failure"]["signature"]) == ("xfail", SIGNATURE)
