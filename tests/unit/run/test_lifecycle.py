"""The run lifecycle `run` and `sweep` share: the directory claimed before anything is written,
each record on disk as it is published, the status, counts and exit code at the close, and
throttled report rewrites that take at most their share of the run's time."""

import pytest

from servematrix.errors import StateError
from servematrix.record import Expected, Failure, RunSummary, ScenarioRecord
from servematrix.run import lifecycle, records


def rec(rid, verdict="pass"):
    return ScenarioRecord(id=rid, scenario=rid.split("/")[0], model="m", tp=1, pp=1, quant="none", vllm="current",
                          device="cpu", expect=Expected(), started_at="t", seconds=0.0, verdict=verdict,
                          failure=Failure.of("exception", "KeyError: x") if verdict == "fail" else None)


def started(tmp_path, **kw):
    run = lifecycle.RunLifecycle(tmp_path / "run", **kw)
    run.claim()
    run.start("m", {"vllm": "0.32.0", "torch": "2"}, ["a/tp1", "b/tp1"])
    return run


def test_a_record_is_on_disk_when_published_and_the_close_counts_and_judges(tmp_path):
    run = started(tmp_path)
    with run.running():
        run.publish(rec("a/tp1"))
        assert [r.id for r in records.recover(tmp_path / "run")] == ["a/tp1"]
        run.publish(rec("b/tp1", "fail"))
    summary = RunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_text())
    assert summary.status == "complete" and summary.counts == {"pass": 1, "fail": 1} and summary.exit_code == 1
    assert summary.ended_at and (tmp_path / "history.sqlite").is_file() and (tmp_path / "latest").is_symlink()


def test_a_republished_id_replaces_its_record(tmp_path):
    run = started(tmp_path)
    with run.running():
        run.publish(rec("a/tp1", "fail"))
        run.publish(rec("a/tp1"))
    assert [r.verdict for r in run.summary.scenarios] == ["pass"] and run.summary.counts == {"pass": 1}


@pytest.mark.parametrize("raised, status, code", [(KeyboardInterrupt, "interrupted", 2), (RuntimeError, "error", 2)])
def test_an_interrupted_or_broken_body_still_cleans_up_and_closes_the_run(tmp_path, raised, status, code):
    run, cleaned = started(tmp_path), []
    with pytest.raises(RuntimeError) if raised is RuntimeError else _nothing():
        with run.running(cleanup=lambda: cleaned.append(True)):
            raise raised("stop")
    summary = RunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_text())
    assert cleaned == [True] and summary.status == status and summary.exit_code == code


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_directory_that_holds_a_run_is_refused_before_anything_is_written(tmp_path):
    run = started(tmp_path)
    with run.running():
        pass
    with pytest.raises(StateError, match="already holds a run"):
        lifecycle.RunLifecycle(tmp_path / "run").claim()


def test_records_published_in_a_batch_are_on_disk_at_once_and_rewrite_the_reports_once(tmp_path):
    writes = []
    run = started(tmp_path, write=lambda summary, trend, pages_of: writes.append(pages_of))
    with run.running():
        with run.batch():
            run.publish(rec("a/tp1"))
            run.publish(rec("b/tp1"))
            assert len(records.recover(tmp_path / "run")) == 2
    assert writes == [None, ["a/tp1", "b/tp1"], None, None]  # start, the batch, the close and its trend


def test_throttled_rewrites_take_at_most_their_share_of_the_runs_time():
    """A rewrite that costs 1 s is not repeated within the next 1 / share s; a cheap one is
    repeated at every chance."""
    clock = {"t": 0.0}
    writes = []

    def write():
        writes.append(clock["t"])
        clock["t"] += cost["s"]  # the rewrite itself takes this long

    cost = {"s": 1.0}
    throttle = lifecycle._Throttle(0.2, clock=lambda: clock["t"])
    for _ in range(12):  # a record every second
        throttle.maybe(write)
        clock["t"] += 1.0
    assert writes == [0.0, 6.0, 12.0]  # each 1-s rewrite followed by >= 1 / share s of records
    cost["s"], writes[:] = 0.0, []
    throttle = lifecycle._Throttle(0.2, clock=lambda: clock["t"])
    for _ in range(5):
        throttle.maybe(write)
        clock["t"] += 1.0
    assert len(writes) == 5
