"""Report writing: every file rewritten atomically, a matrix table with failure signatures, one
JUnit case per scenario and check, secrets never written."""

import json
import os
import stat
import xml.etree.ElementTree as ET

import pytest

from servematrix import report
from servematrix import files
from servematrix.report import junit, markdown
from servematrix.run import rundir
from servematrix.errors import StateError
from servematrix.check.accuracy import gsm8k_metrics
from servematrix.record import Failure
from servematrix.record import Gsm8kResult
from servematrix.config.matrix import Expectation
from servematrix.record import LoadResult, RunSummary, ScenarioRecord
from servematrix.record import ParityResult, PromptResult, SmokeResult

XFAIL = Expectation(expect="xfail", reason="engine dies", bug="https://github.com/vllm-project/vllm/pull/1")


def rec(id_, tp=1, pp=1, verdict="pass", failure=None, expect=Expectation(), **kw):
    scenario = id_.split("/")[0]
    return ScenarioRecord(id=id_, scenario=scenario, model=scenario, tp=tp, pp=pp, quant="fp32",
                          vllm="current", device="cpu", expect=expect, verdict=verdict, failure=failure,
                          started_at="2026-11-22T00:00:00+00:00", seconds=1.0, **kw)


def summary(tmp_path, records):
    return RunSummary(matrix="m", run_dir=str(tmp_path), host="h", vllm_version="0.32.0",
                      torch_version="2.13.0+cpu", servematrix_version="0", started_at="t",
                      scenarios=records, counts={"pass": 1})


def sample_records():
    ok_smoke = SmokeResult(ok=True, prompts=[PromptResult(name="p", endpoint="completions", ok=True, text="x")],
                           parity=ParityResult(ok=True, baseline="a/tp1-pp1-fp32"))
    load_err = Failure.of("exception", "KeyError: 'layers.0.self_attn.qkv_proj.k_scale'")
    pp_err = Failure.of("exception", "AssertionError: assert self.intermediate_tensors is not None", "smoke")
    return [
        rec("a/tp1-pp1-fp32", load=LoadResult(ok=True, seconds=40), smoke=ok_smoke,
            gsm8k=Gsm8kResult(strict=0.25, strict_stderr=0.1, flexible=0.5, flexible_stderr=0.1, n=8, seconds=3),
            metrics=gsm8k_metrics(0.25, 0.5, 8)),
        rec("a/tp2-pp1-fp32", tp=2, verdict="fail", failure=load_err,
            load=LoadResult(ok=False, error=load_err)),
        rec("a/tp1-pp2-fp32", pp=2, verdict="xfail", failure=pp_err, expect=XFAIL, note="engine dies",
            load=LoadResult(ok=True, seconds=40)),
    ]


def test_write_all_writes_every_report_and_leaves_no_temp_files(tmp_path):
    report.write_all(summary(tmp_path, sample_records()))
    pages = ["scenario-a_2Ftp1-pp1-fp32.html", "scenario-a_2Ftp1-pp2-fp32.html", "scenario-a_2Ftp2-pp1-fp32.html"]
    assert sorted(os.listdir(tmp_path)) == ["accuracy.md", "junit.xml", "load-success.md", "report.html",
                                            *pages, "summary.json"]
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["verdict"] for r in data["scenarios"]] == ["pass", "fail", "xfail"]
    assert data["scenarios"][1]["load"]["error"]["signature"].startswith("KeyError")


def test_load_success_table_has_models_down_layouts_across_and_signatures(tmp_path):
    md = markdown.load_success_md(summary(tmp_path, sample_records()))
    assert "| scenario | TP1×PP1 fp32 | TP2×PP1 fp32 | TP1×PP2 fp32 |" in md
    assert "| a | ✓ | ✗ [1] | ✗ (xfail) [2] |" in md
    assert "1. a/tp2-pp1-fp32: [load/exception] KeyError: 'layers.0.self_attn.qkv_proj.k_scale'" in md


def test_accuracy_table_shows_both_metrics_with_stderr_and_n(tmp_path):
    md = markdown.accuracy_md(summary(tmp_path, sample_records()))
    assert "| a/tp1-pp1-fp32 | 0.250 ± 0.100 | 0.500 ± 0.100 | 8 | 3 | ok | ok | — | pass |" in md


def test_junit_has_a_case_per_scenario_and_check_with_failures_and_xfail_skips(tmp_path):
    root = ET.fromstring(junit.junit_xml(summary(tmp_path, sample_records())))
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert {("a/tp1-pp1-fp32", n) for n in ("load", "smoke", "parity", "gsm8k")} <= set(cases)
    assert cases[("a/tp2-pp1-fp32", "load")].find("failure").get("message").startswith("KeyError")
    assert cases[("a/tp1-pp2-fp32", "load")].find("skipped") is not None
    assert root.get("failures") == "1" and root.get("skipped") == "1"


def test_atomic_write_replaces_whole_file_and_redacts_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    target = tmp_path / "r.txt"
    target.write_text("old")
    files.atomic_write(target, "token=hf_supersecretvalue")
    assert target.read_text() == "token=***"
    assert os.listdir(tmp_path) == ["r.txt"]


def test_latest_points_at_the_newest_run(tmp_path):
    for name in ("run1", "run2"):
        (tmp_path / name).mkdir()
        files.point_latest(tmp_path / name)
    assert os.readlink(tmp_path / "latest") == "run2"


def test_a_load_checked_entry_is_marked_as_such_in_both_reports(tmp_path):
    from servematrix.report import html as report_html
    from servematrix.record import LoadCheckResult, RankResult

    checked = rec("g/tp1-pp2-bf16", pp=2, load=LoadResult(ok=True, seconds=3.0),
                  load_check=LoadCheckResult(ok=True, seconds=3.0, ranks=[RankResult(rank=0, ok=True),
                                                                          RankResult(rank=1, ok=True)]))
    s = summary(tmp_path, [sample_records()[0], checked])
    md = markdown.load_success_md(s)
    assert "| g |  | ✓ ᴸ |" in md
    assert "ᴸ load check, no server" in md
    assert "| a | ✓ |" in md  # a served entry carries no mark
    page = report_html.render(s, None)
    assert 'data-evidence="load check"' in page and 'data-evidence="served"' in page


def test_a_new_report_gets_the_usual_mode_and_an_existing_one_keeps_its_own(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "new.md", "x")
        kept = tmp_path / "kept.md"
        kept.write_text("old")
        kept.chmod(0o640)
        files.atomic_write(kept, "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"


def test_a_symlink_to_a_regular_file_is_written_through_and_kept(tmp_path):
    (tmp_path / "real.yaml").write_text("old")
    (tmp_path / "link.yaml").symlink_to("real.yaml")
    files.atomic_write(tmp_path / "link.yaml", "new")
    assert (tmp_path / "link.yaml").is_symlink() and (tmp_path / "real.yaml").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.yaml", "real.yaml"]


@pytest.mark.parametrize("kind, message", [
    ("dir", "is a directory"), ("fifo", "is a FIFO"), ("device", r"is a device \(through a symlink\)"),
    ("link-to-dir", r"is a directory \(through a symlink\)"), ("dangling", "symlink to a missing file"),
])
def test_a_special_file_is_never_a_report_target(tmp_path, kind, message):
    target = tmp_path / "t"
    {"dir": lambda: target.mkdir(), "fifo": lambda: os.mkfifo(target),
     "device": lambda: target.symlink_to("/dev/null"),
     "link-to-dir": lambda: ((tmp_path / "d").mkdir(), target.symlink_to("d")),
     "dangling": lambda: target.symlink_to("gone")}[kind]()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StateError, match=message):
        files.atomic_write(target, "x")
    assert sorted(os.listdir(tmp_path)) == before  # no temp file left either


def test_a_run_directory_is_claimed_only_when_free_or_overwrite_is_given(tmp_path):
    out = tmp_path / "reports" / "r1"
    rundir.claim(out)
    assert out.is_dir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(StateError, match="already holds a run"):
        rundir.claim(out)
    rundir.claim(out, overwrite=True)
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(StateError, match="not a directory"):
            rundir.claim(bad)
