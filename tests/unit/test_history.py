"""History store (SQLite): runs append, trends read back per scenario, diffs between runs."""

from servematrix import history
from servematrix.accuracy import Check, MetricValue, judge
from servematrix.matrix import Expectation
from servematrix.results import LoadResult, RunSummary, ScenarioRecord


def rec(id_, verdict, agreement):
    m = MetricValue(mean=agreement, sigma=0.3, stderr=0.03, n=100)
    c = judge(Check(metric="gsm8k.agreement", effect=0.1), m, None)
    c.mde = 0.1
    return ScenarioRecord(id=id_, scenario="a", model="a", tp=1, pp=1, quant="fp32", vllm="current", device="cpu",
                          expect=Expectation(), verdict=verdict, load=LoadResult(ok=verdict == "pass"),
                          metrics={"gsm8k.agreement": m}, accuracy=[c], started_at="t", seconds=1)


def run(tmp_path, name, started, *records):
    return RunSummary(matrix="m", run_dir=str(tmp_path / name), host="h", vllm_version="0.32.0",
                      torch_version="t", servematrix_version="0", started_at=started, status="complete",
                      scenarios=list(records))


def test_runs_append_and_trend_reads_them_back_oldest_first(tmp_path):
    db = tmp_path / "history.sqlite"
    history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", "pass", 0.9)), db)
    history.append(run(tmp_path, "r2", "2026-01-02", rec("a/x", "fail", 0.5)), db)
    t = history.trend(db)
    assert [i["verdict"] for i in t["a/x"]] == ["pass", "fail"]
    assert [i["metrics"]["gsm8k.agreement"]["mean"] for i in t["a/x"]] == [0.9, 0.5]
    assert "a/x: pass fail" in history.render_trend(t)


def test_appending_the_same_run_twice_replaces_it(tmp_path):
    db = tmp_path / "history.sqlite"
    for verdict in ("pass", "fail"):
        history.append(run(tmp_path, "r1", "2026-01-01", rec("a/x", verdict, 0.9)), db)
    assert [i["verdict"] for i in history.trend(db)["a/x"]] == ["fail"]


def test_diff_lists_newly_failing_passing_and_moves_beyond_the_mde(tmp_path):
    a = run(tmp_path, "a", "1", rec("a/x", "pass", 0.9), rec("a/y", "fail", 0.9), rec("a/z", "pass", 0.9))
    b = run(tmp_path, "b", "2", rec("a/x", "fail", 0.5), rec("a/y", "pass", 0.88), rec("a/w", "pass", 0.9))
    d = history.diff(a, b)
    assert [x.split(":")[0] for x in d["newly failing"]] == ["a/x"]
    assert [x.split(":")[0] for x in d["newly passing"]] == ["a/y"]
    assert [x.split(":")[0] for x in d["accuracy moves"]] == ["a/x"]
    assert d["only in A"] == ["a/z"] and d["only in B"] == ["a/w"]
