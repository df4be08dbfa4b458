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


# `make test` runs two pytest-xdist workers. Each integration module belongs to one of two streams,
# which the two workers run side by side; the unit tests fill in around them. Why it pays on a 2-core
# host: a vLLM server starts by importing vLLM in three processes one after the other (~7 s each, one
# core busy), a TP=1 server computes on one core (VLLM_CPU_OMP_THREADS_BIND=auto keeps the other for
# the front end), image builds and container starts wait on I/O: one stream alone leaves a core idle
# much of the time. What must share a stream is what shares a session fixture: `default_run` (the
# default matrix, its Ray comparison, the compose repro's local tokens). The streams' times are in
# docs/testing.md.
STREAMS = {"test_default_matrix.py": "default-run", "test_containers.py": "default-run"}
OTHER_STREAM = "served"  # every other integration module


def stream(nodeid: str) -> str | None:
    """The stream an integration test runs in (None: a unit test, scheduled on its own)."""
    path = nodeid.split("::", 1)[0]
    if not path.startswith("tests/integration/"):
        return None
    return STREAMS.get(path.rsplit("/", 1)[-1], OTHER_STREAM)


@pytest.hookimpl(optionalhook=True)  # a plain pytest run without xdist has no such hook
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler, a stream being one scope: a scope goes to one worker whole (xdist
    hands out the largest scopes first), every unit test is a scope of its own. (Not `--dist
    loadgroup`: its xdist_group mark renames item._nodeid, which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Streams(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return stream(nodeid) or nodeid

    return Streams(config, log)
