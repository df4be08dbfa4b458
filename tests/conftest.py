import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture
def write(tmp_path):
    """write(name, text) -> Path: a file under a temp dir (for matrix/scenario fixtures)."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write


# The integration tests' cache, kept across test sessions on this machine (tests/integration/
# conftest.py says why that is safe); unit tests only read it (test_smollm2.py).
MACHINE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "servematrix-test"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # forged checkpoints are shared between tests of one session, never with the user's cache
    cache = os.environ.get("SERVEMATRIX_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("SERVEMATRIX_CACHE", cache)
