"""Property: a tensor name of any text — in a safetensors header or as a key of the index weight
map — is read as it is or refused as a corrupt header / a located index error; never another
exception, and a name that is read is one line of text (it becomes a scenario's extra tensor and
a printed line). The header fuzz of test_mirror_fuzz.py runs `mirror` end to end and draws names
too, but rarely one with a control character: round 4's probe found that case an internal error
(its end-to-end test: tests/unit/cli/test_boundary_round4.py). These read the two inputs alone,
so they afford many examples."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servematrix.errors import ConfigError, StateError
from servematrix.mirror.inputs import read_header, read_index

from .sources import header_only

EXAMPLES = int(os.environ.get("SERVEMATRIX_MIRROR_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES * 4, deadline=None, derandomize=EXAMPLES <= 30, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# names as they come: any text, weighted towards what breaks a line or a terminal
NAMES = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.sampled_from("ab.\x00\x07\x1b\n\r\t\x85\u2028\u2029\u202e[]0;"), min_size=1, max_size=20),
    st.sampled_from(["", "x" * 1000, "x" * 1001, "model.norm.weight\n", "\x1b]0;x\x07"]),
)
_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _write_header(path: Path, names: list[str]) -> None:
    header_only(path, {name: ("F32", [2]) for name in names})


@FUZZ
@given(name=NAMES)
def test_a_header_tensor_name_of_any_text_is_read_as_one_line_or_refused_as_corrupt(tmp_path_factory, name):
    path = tmp_path_factory.mktemp("h") / "model.safetensors"
    _write_header(path, ["model.norm.weight", name])
    try:
        names = set(read_header(path))
    except StateError as exc:
        assert "corrupt safetensors header" in str(exc) and "\n" not in str(exc), str(exc)
        return
    assert name in names and name != "" and len(name) <= 1000 and not _ONE_LINE.search(name), repr(name)


@FUZZ
@given(name=NAMES)
def test_an_index_tensor_name_of_any_text_is_read_as_one_line_or_refused_at_a_line(tmp_path_factory, name):
    path = tmp_path_factory.mktemp("i") / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "a.safetensors",
                                                                name: "a.safetensors"}}, indent=1))
    try:
        index = read_index(path)
    except ConfigError as exc:
        assert exc.field == "weight_map" and "\n" not in str(exc), str(exc)
        return
    assert name in index.weight_map and name != "" and len(name) <= 1000 and not _ONE_LINE.search(name), repr(name)
