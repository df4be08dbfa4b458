"""Bisect's search over releases: the adjacent pair where the outcome changes, probing as few
releases as it needs, skipping those that cannot be judged."""

import pytest

from servematrix.run.bisect import Probe, bisect, candidates, search, version_key
from servematrix.errors import ArgumentError, StateError

RELEASES = ["cpu-0.18.1", "cpu-0.20.2", "cpu-0.21.0", "cpu-0.24.0", "cpu-0.27.0", "cpu-0.32.0"]


def prober(outcomes: dict[str, str], seen: list[str]):
    def probe(name):
        seen.append(name)
        return Probe(release=name, outcome=outcomes[name], verdict="x")
    return probe


def test_a_fix_is_found_between_the_last_bad_and_the_first_good_release():
    outcomes = {"cpu-0.18.1": "bad", "cpu-0.20.2": "bad", "cpu-0.21.0": "good", "cpu-0.24.0": "good",
                "cpu-0.27.0": "good", "cpu-0.32.0": "good"}
    seen = []
    _, pair = search(RELEASES, prober(outcomes, seen))
    assert (pair[0].release, pair[1].release) == ("cpu-0.20.2", "cpu-0.21.0")
    assert len(seen) == 4 and "cpu-0.24.0" not in seen  # environments built only where the search went


def test_a_release_that_cannot_be_judged_is_skipped():
    outcomes = {"cpu-0.18.1": "good", "cpu-0.20.2": "good", "cpu-0.21.0": "other", "cpu-0.24.0": "good",
                "cpu-0.27.0": "bad", "cpu-0.32.0": "bad"}
    _, pair = search(RELEASES, prober(outcomes, []))
    assert (pair[0].release, pair[1].release) == ("cpu-0.24.0", "cpu-0.27.0")


def test_no_pair_when_both_ends_agree():
    outcomes = dict.fromkeys(RELEASES, "good")
    probes, pair = search(RELEASES, prober(outcomes, []))
    assert pair is None and len(probes) == 2


def test_candidates_are_the_declared_releases_in_version_order_between_the_bounds():
    got = candidates("0.32.0", "0.18.1")
    assert got[0] == "cpu-0.18.1" and got[-1] == "cpu-0.32.0"
    assert got == sorted(got, key=version_key) and "cpu-0.20.2" in got and "cpu-0.21.0" in got


def test_a_release_that_is_not_declared_is_an_argument_error_listing_the_declared_ones():
    with pytest.raises(ArgumentError, match=r"--between: '0\.0\.1' is not a declared vLLM release .*cpu-0\.18\.1"):
        candidates("0.0.1", "0.32.0")


def test_every_run_directory_the_search_may_reach_is_checked_before_any_probe(tmp_path, monkeypatch):
    from servematrix.serve import envs

    probed = []
    monkeypatch.setattr(envs, "probe", lambda python: probed.append(python) or {})
    (tmp_path / "cpu-0.21.0").mkdir()
    (tmp_path / "cpu-0.21.0" / "summary.json").write_text("{}")
    with pytest.raises(StateError, match="cpu-0.21.0: already holds a run"):
        bisect(None, None, "0.20.2", "0.21.0", tmp_path, None)
    assert probed == []


def test_one_probe_rule_for_entries_and_cells_a_record_not_run_there_cannot_be_judged(tmp_path):
    from servematrix.record import Expected, Failure, ScenarioRecord
    from servematrix.run.bisect import probe_of

    def rec(verdict, failure=None, note=None):
        return ScenarioRecord(id="s/tp1-pp1-bf16", scenario="s", model="m", tp=1, pp=1, quant="bf16", vllm="current",
                              device="cpu", expect=Expected(), started_at="t", seconds=1.0, verdict=verdict,
                              failure=failure, note=note)

    skipped = probe_of("cpu-0.20.2", rec("skipped", note="needs 2 GPUs; this host has 0"), tmp_path, None)
    assert skipped.outcome == "other" and skipped.signature == "needs 2 GPUs; this host has 0"
    assert probe_of("cpu-0.20.2", rec("pass"), tmp_path, None).outcome == "good"
    bad = probe_of("cpu-0.20.2", rec("fail", Failure.of("exception", "KeyError: 'w'")), tmp_path, "KeyError")
    assert bad.outcome == "bad" and bad.signature == "KeyError: 'w'" and bad.log is None
    other = probe_of("cpu-0.20.2", rec("fail", Failure.of("exception", "ValueError: x")), tmp_path, "KeyError")
    assert other.outcome == "other"
