"""Integration tests start real vLLM servers (the CPU build) through the servematrix CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _have_vllm() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(bool(u.find_spec('vllm')))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def pytest_collection_modifyitems(config, items):
    if _have_vllm():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed in this interpreter (run `make test`)")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


def servematrix(*args: str, timeout: float = 1500, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI from the repo root, as a user would."""
    return subprocess.run([sys.executable, "-m", "servematrix.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **kw.pop("env", {})}, **kw)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One forge cache for the whole session, so each checkpoint is forged once."""
    path = os.environ.get("SERVEMATRIX_TEST_CACHE") or str(tmp_path_factory.mktemp("forge-cache"))
    os.environ["SERVEMATRIX_TEST_CACHE"] = path
    return path
