"""The two test streams `make test` runs side by side (tests/conftest.py): a session fixture that
serves a matrix must not be started in both, or the default matrix runs twice at once."""

import re
from pathlib import Path

from tests.conftest import STREAMS, stream

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"


def test_every_module_that_reads_the_default_run_is_in_the_default_run_stream():
    readers = [p.name for p in sorted(INTEGRATION.glob("test_*.py")) if re.search(r"\bdefault_run\b", p.read_text())]
    assert "test_default_matrix.py" in readers or "test_containers.py" in readers
    assert {stream(f"tests/integration/{name}::test_x") for name in readers} == {"default-run"}, readers


def test_each_stream_names_a_module_that_exists_and_unit_tests_belong_to_none():
    assert all((INTEGRATION / name).is_file() for name in STREAMS)
    assert stream("tests/integration/test_seed_bugs.py::test_38191_reproduced_on_0_20_2_without_the_fix") == "served"
    assert stream("tests/unit/run/test_session.py::test_x[a/b]") is None
