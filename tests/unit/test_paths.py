"""paths.build_cached: one build per target, published whole; a reused target's marker touched on request
(the test cache prunes what no session touched for 14 days by the marker's age)."""

import json
import os

import pytest

from servematrix.paths import build_cached


def _builder(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"x")
        return {"built": len(calls)}
    return build


def test_a_built_target_is_reused_without_building_again(tmp_path):
    calls, target = [], tmp_path / "twin"
    assert build_cached(target, "done.json", _builder(calls)) == target
    assert build_cached(target, "done.json", _builder(calls)) == target
    assert len(calls) == 1 and json.loads((target / "done.json").read_text()) == {"built": 1}
    assert (target / "weights.bin").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["twin"]  # no temporary sibling left behind


def test_touch_renews_a_reused_markers_age_and_the_default_leaves_it(tmp_path):
    target = tmp_path / "twin"
    build_cached(target, "done.json", _builder([]))
    old = 1_000_000_000
    os.utime(target / "done.json", (old, old))
    build_cached(target, "done.json", _builder([]))
    assert (target / "done.json").stat().st_mtime == old
    build_cached(target, "done.json", _builder([]), touch=True)
    assert (target / "done.json").stat().st_mtime > old


def test_a_failed_build_publishes_nothing(tmp_path):
    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise ValueError("the writer refuses")
    with pytest.raises(ValueError, match="refuses"):
        build_cached(tmp_path / "twin", "done.json", broken)
    assert list(tmp_path.iterdir()) == []
