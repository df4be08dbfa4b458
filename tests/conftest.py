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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # forged checkpoints are shared between tests of one session, never with the user's cache
    cache = os.environ.get("SERVEMATRIX_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("SERVEMATRIX_CACHE", cache)
