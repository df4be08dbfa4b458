"""Property: whatever text `servematrix sweep` is given as --layouts, --quant or --vllm, it is read
as layouts TP/PP 1-99 whose names are exactly what a cell id holds, known quantizations and a
release, or refused as one line naming the argument (and shown escaped); never another exception.
End to end, a sweep whose --out is a file is refused before anything is asked or written, whatever
the other arguments hold. Nothing here starts vLLM or asks a package registry."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servematrix.cli import main
from servematrix.errors import ArgumentError

from .test_boundary_cases import snapshot, work  # noqa: F401

EXAMPLES = int(os.environ.get("SERVEMATRIX_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

WORDS = st.sampled_from(["tp1", "tp2", "pp2", "tp2pp2", "tp0", "pp0", "tp100", "tp99pp99", "pp2tp2", "tp", "",
                         "none", "fp8-block", "awq", "gptq", "NONE", "nvfp4", "current", "cpu-0.20.2", "0.20.2",
                         "../x", "\x1b]0;x\x07", "tp2\n", " tp2 ", "\u202etp2", "tp２", "tp٢", "tp1٢", "tp2pp1２"])
TEXT = st.lists(WORDS | st.text(max_size=8), max_size=4).map(",".join) | st.text(max_size=30)
_LAYOUT_NAME = re.compile(r"(tp[1-9][0-9]?)?(pp[1-9][0-9]?)?")


@FUZZ
@given(text=TEXT)
def test_layouts_of_any_text_are_exact_names_or_one_refusal_naming_layouts(text):
    from servematrix.sweep.cells import layouts

    try:
        got = layouts(text)
    except ArgumentError as exc:
        assert str(exc).startswith("--layouts: "), str(exc)
        return
    assert got
    for lay in got:  # the name is what a cell id and a record hold: ASCII, no space, no escape
        assert lay.name and lay.name.isascii() and _LAYOUT_NAME.fullmatch(lay.name), repr(lay.name)
        assert 1 <= lay.tp <= 99 and 1 <= lay.pp <= 99


@FUZZ
@given(text=TEXT)
def test_quants_of_any_text_are_known_names_or_one_refusal_naming_quant(text):
    from servematrix.sweep.cells import quants
    from servematrix.sweep.quant import names

    try:
        got = quants(text)
    except ArgumentError as exc:
        assert str(exc).startswith("--quant: "), str(exc)
        return
    assert got and set(got) <= set(names())


@pytest.fixture
def out_is_a_file(work):  # noqa: F811 - the fixture of test_boundary_cases
    work.file("notes.txt", "mine\n")
    return work


@FUZZ
@given(layouts=TEXT, quant=TEXT, vllm=TEXT, k=TEXT)
def test_a_sweep_whose_out_is_a_file_is_refused_in_one_line_and_writes_nothing(out_is_a_file, layouts, quant, vllm, k):
    before = snapshot(out_is_a_file.tmp)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["sweep", f"--layouts={layouts}", f"--quant={quant}", f"--vllm={vllm}", f"-k={k}",
                   "--out", "notes.txt"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    assert "internal error" not in lines[0] and "\x1b" not in lines[0], lines
    assert "notes.txt" in lines[0], lines  # --out is checked first: nothing resolved, nothing asked
    assert snapshot(out_is_a_file.tmp) == before
