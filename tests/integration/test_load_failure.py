"""A broken checkpoint on real vLLM: the server dies while loading weights, the run records the
exception line as the signature at once (not after the start-up timeout), and the verdict follows
the expectation: fail (exit 1) when it was expected to pass, xfail (exit 0) when waived. The
expected-to-pass case runs once, in test_secrets.py (the same broken start, with secrets to keep)."""

import json

import pytest

from .conftest import servematrix

pytestmark = pytest.mark.integration
SIGNATURE = "RuntimeError: start (0) + length (128) exceeds dimension size (64)."


def test_the_shipped_broken_matrix_waives_it_as_xfail(tmp_path, shared_cache):
    out = tmp_path / "run"
    proc = servematrix("run", "matrix/broken.yaml", "--out", str(out), env={"SERVEMATRIX_CACHE": shared_cache})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert (r["verdict"], r["failure"]["signature"]) == ("xfail", SIGNATURE)
