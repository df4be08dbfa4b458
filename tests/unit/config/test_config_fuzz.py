"""Property: whatever a shipped matrix or scenario file is mutated into, `servematrix validate` exits
0 or 2; on 2 it prints one line naming the file (the mutated one, the matrix validated, or a file
the mutated matrix points at); never a traceback or an "internal error"; and it writes nothing (the
copy of the repo and the servematrix cache are unchanged).

Every shipped file (matrix/*.yaml, scenarios/*.yaml) gets three kinds of mutation, each in a fresh
copy of matrix/, scenarios/ and references/ (matrix files name ../scenarios and ../references):
bytes (flip, insert, delete, invalid UTF-8, control characters, other encodings), YAML structure
(aliases, recursive aliases, alias bombs, deep nesting, documents, duplicate keys) and typed values
(any node replaced by a wrong type, a huge, negative or zero number, nan, inf, a bool, an empty
list, a long string, a shared or self-containing node; keys dropped or added)."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servematrix.cli import main

REPO = Path(__file__).resolve().parents[3]
MATRICES = sorted((REPO / "matrix").glob("*.yaml"))
SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))
SHIPPED = [p.relative_to(REPO) for p in MATRICES + SCENARIOS]

# 21 files x 3 kinds x 40 examples: about 35 s on an idle 2-core host (~15 ms an example);
# derandomized, so CI sees the same examples every time
EXAMPLES = 40
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _validated(file: Path) -> str:
    """The matrix validated after mutating `file`: itself, or for a scenario a one-entry matrix
    that includes it (every other scenario of a shipped matrix would be loaded for nothing)."""
    return str(file) if file.parts[0] == "matrix" else f"matrix/fuzz-{file.stem}.yaml"


# --- mutations -----------------------------------------------------------------------------------
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe9"]
CONTROL = [bytes([c]) for c in [*range(0, 9), 11, 12, *range(14, 32), 127]] + ["\x85", "\u2028", "\ufeff"]
CONTROL = [c if isinstance(c, bytes) else c.encode() for c in CONTROL]
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "utf-8-sig", "cp500"]


@st.composite
def byte_mutation(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "insert", "delete", "utf8", "control", "encoding", "truncate", "huge"]))
    at = draw(st.integers(0, len(raw)))
    if kind == "flip" and raw:
        at = min(at, len(raw) - 1)
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if kind == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 64)):]
    if kind == "utf8":
        return raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    if kind == "control":
        return raw[:at] + draw(st.sampled_from(CONTROL)) + raw[at:]
    if kind == "encoding":
        return raw.decode().encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    if kind == "huge":  # a 5000-digit number: more than Python converts from text
        return raw[:at] + b"9" * 5000 + raw[at:]
    return raw[:at]


def _bomb(levels: int) -> str:
    return "".join(f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 9 if i else ["x"] * 9) + "]\n"
                   for i in range(levels))


@st.composite
def structure_mutation(draw, raw: bytes) -> bytes:
    lines = raw.decode().splitlines(keepends=True)
    i = draw(st.integers(0, len(lines)))
    valued = [j for j, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("#")]
    j = draw(st.sampled_from(valued)) if valued else 0
    key, _, _ = lines[j].partition(": ") if valued else ("x", "", "")
    depth = draw(st.integers(1, 200))
    kind = draw(st.sampled_from(["self-alias", "undefined-alias", "bomb", "deep", "deep-map", "document",
                                 "duplicate", "tab", "merge", "anchor-reuse", "flow-break"]))
    value = {
        "self-alias": "&r [1, *r]",
        "undefined-alias": "*nowhere",
        "deep": "[" * depth + "1" + "]" * depth,
        "deep-map": "{a: " * depth + "1" + "}" * depth,
        "merge": "{<<: *nowhere}",
        "anchor-reuse": "&a 1",
        "flow-break": "[1, {",
    }.get(kind)
    if value is not None:
        lines[j] = f"{key}: {value}\n"
        if kind == "anchor-reuse":  # a second, complete use of the anchor elsewhere: legal YAML
            k = draw(st.sampled_from(valued))
            if k > j:
                lines[k] = lines[k].partition(": ")[0] + ": *a\n"
    elif kind == "bomb":
        lines.insert(i, _bomb(draw(st.integers(1, 9))))
    elif kind == "document":
        lines.insert(i, "---\n")
    elif kind == "duplicate" and valued:
        lines.insert(j + 1, lines[j])
    elif kind == "tab":
        lines[j] = "\t" + lines[j] if valued else lines[j]
    return "".join(lines).encode()


EVIL = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2, 1024, 1025, 1319, 1320, 2**31, 2**63, 10**30, -10**30, 1.5,
                     -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf, "", " ", "x" * 10_000, "\0", "a\nb",
                     "\x1b[2J", "../../etc/passwd", "/", "x" * 300, "../scenarios", "../matrix", ".", "é", "*",
                     "[", "1e9", "true", "tpu", "cpu", "gpu",
                     "fp32", "current", [], {}, [1, 2], [None], ["x"], {"a": 1}, {"": None}, [[[[[1]]]]]]),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.lists(st.integers(-5, 5000), max_size=4),
)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _get(data, path):
    for p in path:
        data = data[p]
    return data


@st.composite
def typed_mutation(draw, raw: bytes) -> bytes:
    data = yaml.safe_load(raw)
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    data = copy.deepcopy(data)
    parent, last = _get(data, path[:-1]), path[-1]
    kind = draw(st.sampled_from(["value", "value", "value", "drop", "add", "share", "self", "nest"]))
    if kind == "drop":
        del parent[last]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["bogus", "tp", "env", "name", "limit"]))] = draw(EVIL)
    elif kind == "share":  # the same node in two places: safe_dump writes an anchor and an alias
        parent[last] = _get(data, draw(st.sampled_from(paths)))
    elif kind == "self":  # a node inside itself: a recursive alias
        loop: list = []
        loop.append(loop)
        parent[last] = loop
    elif kind == "nest":
        value = draw(EVIL)
        for _ in range(draw(st.integers(1, 60))):
            value = [value]
        parent[last] = value
    else:
        parent[last] = draw(EVIL)
    try:
        return yaml.safe_dump(data, allow_unicode=draw(st.booleans()), sort_keys=False).encode()
    except (yaml.YAMLError, RecursionError, ValueError):  # what the test cannot write is not a case
        return raw


KINDS = {"bytes": byte_mutation, "structure": structure_mutation, "typed": typed_mutation}


# --- the property --------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _validate_mutated(file: str, mutate, capsys) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        for d in ("matrix", "scenarios", "references"):
            shutil.copytree(REPO / d, root / d)
        matrix = _validated(Path(file))
        if not (root / matrix).exists():
            (root / matrix).write_text(f"name: fuzz\ninclude:\n  - scenario: {Path(file).stem}\n")
        target = root / file
        target.write_bytes(mutate(target.read_bytes()))
        cache = Path(tmp) / "cache"
        before = _snapshot(Path(tmp))
        with mock.patch.dict(os.environ, {"SERVEMATRIX_CACHE": str(cache)}):
            code = main(["validate", str(root / matrix)])
        out, err = capsys.readouterr()
        assert code in (0, 2), (code, err)
        assert "Traceback" not in out + err and "internal error" not in err, err
        if code == 2:
            assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
            named = err[len("error: "):]
            allowed = [str(target), str(root / matrix)]
            if file.startswith("matrix/"):  # a mutated matrix may point at any file of the copy
                allowed.append(str(root) + os.sep)
            assert any(named.startswith(a) for a in allowed), (err, allowed)
        assert _snapshot(Path(tmp)) == before and not cache.exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("file", [str(f) for f in SHIPPED])
@FUZZ
@given(data=st.data())
def test_a_mutated_config_file_is_valid_or_one_located_line_and_nothing_is_written(file, kind, data, capsys):
    raw = (REPO / file).read_bytes()
    mutated = data.draw(KINDS[kind](raw), label="mutated")
    _validate_mutated(file, lambda _: mutated, capsys)


def test_unmutated_every_shipped_file_validates(capsys):
    assert MATRICES and SCENARIOS
    for file in SHIPPED:
        _validate_mutated(str(file), lambda raw: raw, capsys)
        assert capsys.readouterr().err == ""
