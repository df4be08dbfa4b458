"""Fixtures shared by the mirror tests: `cache` sets SERVEMATRIX_CACHE to the session's forge cache
(the path tests/conftest.py's autouse `_isolated_cache` uses by default) for the whole test module
that asks for it. Its scope is the module: each test file here gets its own, undone at its end."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the session's forge cache (conftest's), set here too: module fixtures run before its autouse one
    path = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVEMATRIX_CACHE", str(path))
        yield path
