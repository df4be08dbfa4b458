"""The HTML report renders in headless Chromium: screenshot it, and check that the heatmap is in
the rendered DOM and its colours are on the screenshot."""

import shutil
import subprocess

import pytest

from servematrix.report import html as report_html

from .test_report import sample_records, summary

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def page(tmp_path):
    s = summary(tmp_path, sample_records())
    trend = {"a/tp1-pp1-fp32": [{"verdict": v, "started_at": str(i), "metrics": {"gsm8k.flexible": {"mean": m}}}
                                for i, (v, m) in enumerate([("pass", 0.2), ("fail", 0.1), ("pass", 0.25)])]}
    path = tmp_path / "report.html"
    path.write_text(report_html.render(s, trend))
    return path


def test_report_renders_in_chromium_with_the_heatmap_in_the_dom(tmp_path, page):
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert 'id="heatmap"' in dom
    assert dom.count('class="cell"') == 3 and 'data-verdict="xfail"' in dom
    assert 'id="accuracy"' in dom and 'id="trend"' in dom and "<polyline" in dom


def test_screenshot_shows_the_heatmap_colours(tmp_path, page):
    from PIL import Image

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    img = Image.open(shot).convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    for verdict in ("pass", "fail", "xfail"):
        rgb = tuple(int(report_html.COLOURS[verdict][i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, f"{verdict} colour {rgb} not on the screenshot"


# --- pictures: trend charts and scenario pages ------------------------------------------------------
from servematrix import report  # noqa: E402
from servematrix.check.accuracy import judge  # noqa: E402
from servematrix.config.references import Check, RefKey, Reference  # noqa: E402
from servematrix.record import MetricValue  # noqa: E402
from servematrix import files  # noqa: E402
from servematrix.report import pages, trends  # noqa: E402

NLL_REF = Reference(key=RefKey(scenario="a", quant="fp32"), metric="gsm8k.nll", mean=1.41, sigma=0.32, n=24)


def nll_check(mean):
    return judge(Check(metric="gsm8k.nll", effect=0.25), MetricValue(mean=mean, sigma=0.32, stderr=0.07, n=24), NLL_REF)


def history_rows(means_verdicts):
    return [{"verdict": v, "started_at": f"2026-11-{20 + i:02d}T01:00:00", "run_dir": f"/r{i}",
             "metrics": {"gsm8k.nll": {"mean": m}}, "accuracy": [nll_check(m).model_dump()]}
            for i, (m, v) in enumerate(means_verdicts)]


ROWS = history_rows([(1.41, "pass"), (1.45, "pass"), (1.74, "fail"), (1.40, "pass")])


def test_a_chart_draws_each_run_the_reference_and_the_threshold_band():
    svg = trends.charts(ROWS)
    assert svg.count('<circle class="run"') == 4 and svg.count('data-verdict="fail"') == 1
    assert svg.count('class="band"') == 1 and 'class="threshold"' in svg and 'class="reference"' in svg
    assert "gsm8k.nll (lower is better) · 4 runs" in svg and "2026-11-22T01:00:00: 1.7400 (fail)" in svg
    thr = nll_check(1.4).threshold
    assert f"threshold {thr:.4g}" in svg and "ref 1.41" in svg
    assert "<script" not in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")


def test_a_chart_takes_the_current_check_where_a_run_kept_none_and_skips_what_it_cannot_draw():
    rows = [{"verdict": "pass", "started_at": "a", "metrics": {"gsm8k.nll": {"mean": 1.4}}},
            {"verdict": "pass", "started_at": "b", "metrics": {"gsm8k.nll": {"mean": float("nan")}}}]
    pts = trends.series(rows, "gsm8k.nll", nll_check(1.4))
    assert len(pts) == 1 and pts[0]["reference"] == 1.41 and pts[0]["threshold"] > 1.41
    assert trends.series(rows, "gsm8k.nll") == [{"mean": 1.4, "n": None, "verdict": "pass", "at": "a",
                                                 "reference": None, "threshold": None, "protocol": None}]
    assert trends.chart("gsm8k.nll", []) == "" and 'class="band"' not in trends.chart("gsm8k.nll", trends.series(rows, "gsm8k.nll"))


def test_page_names_are_one_to_one_file_names():
    names = {files.page_name(i) for i in ("a/tp1", "a_tp1", "a_2Ftp1", "a/tp1+fix")}
    assert len(names) == 4 and all("/" not in n and n.startswith("scenario-") for n in names)
    assert files.page_name("tiny-llama/tp1-pp1-fp32") == "scenario-tiny-llama_2Ftp1-pp1-fp32.html"


LOG = [f"INFO line {i}" for i in range(1, 60)]
LOG[40] = "ERROR ... [multiproc_executor.py:1063]     assert self.intermediate_tensors is not None"


@pytest.fixture
def run_dir(tmp_path):
    s = summary(tmp_path / "run", sample_records())
    for r in s.scenarios:
        (tmp_path / "run" / r.id).mkdir(parents=True)
    (tmp_path / "run" / "a/tp1-pp2-fp32" / "server.log").write_text("\n".join(LOG) + "\n")
    (tmp_path / "run" / "a/tp2-pp1-fp32" / "server.log").write_text("only\r progress\nlines\n")
    report.write_all(s, {"a/tp1-pp1-fp32": ROWS, "a/tp1-pp2-fp32": [{"verdict": "xfail", "started_at": "x",
                                                                      "metrics": {}, "accuracy": []}]})
    return tmp_path / "run"


def test_write_all_writes_a_page_per_scenario_linked_from_the_report(run_dir):
    html_text = (run_dir / "report.html").read_text()
    for r in ("a/tp1-pp1-fp32", "a/tp2-pp1-fp32", "a/tp1-pp2-fp32"):
        assert (run_dir / files.page_name(r)).is_file() and f'href="{files.page_name(r)}"' in html_text
    assert html_text.count('class="trend-chart"') == 1  # the history names one metric of one scenario


def test_a_scenario_page_holds_smoke_parity_and_the_log_around_its_failure(run_dir):
    ok = (run_dir / files.page_name("a/tp1-pp1-fp32")).read_text()
    assert 'id="smoke"' in ok and "<pre>x</pre>" in ok and 'class="trend-chart"' in ok and "No failure" in ok
    pp2 = (run_dir / files.page_name("a/tp1-pp2-fp32")).read_text()
    # the signature is "AssertionError: assert ...": its message is what the traceback line holds
    assert 'id="log"' in pp2 and "lines 29–53" in pp2
    assert '<span class="hit">    41  ERROR ... [multiproc_executor.py:1063]     assert self' in pp2
    assert "last 1 runs" in pp2 and "No metrics measured" in pp2
    tp2 = (run_dir / files.page_name("a/tp2-pp1-fp32")).read_text()
    # not found: the tail, numbered by "\n" only, a "\r" redraw shown as a terminal shows it
    assert "lines 1–2" in tp2 and "<span>     1   progress</span>" in tp2


def test_a_gsm8k_failure_shows_lm_evals_log(tmp_path):
    from servematrix.record import Failure

    r = sample_records()[0].model_copy(update={"failure": Failure.of("tool", "lm-eval crashed: KeyError 'x'", "gsm8k")})
    log = tmp_path / r.id / "gsm8k" / "lm_eval.log"
    log.parent.mkdir(parents=True)
    log.write_text("start\nTraceback\nlm-eval crashed: KeyError 'x'\nend\n")
    (tmp_path / r.id / "server.log").write_text("server fine\n")
    assert pages.log_excerpt(tmp_path, r) == ("lm_eval.log", [(1, "start", False), (2, "Traceback", False),
                                                              (3, "lm-eval crashed: KeyError 'x'", True),
                                                              (4, "end", False)])


def _pixels(path):
    from PIL import Image

    return {c for _, c in Image.open(path).convert("RGB").getcolors(maxcolors=1 << 22)}


def _rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_charts_and_the_scenario_page_render_in_chromium(tmp_path, run_dir):
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", (run_dir / "report.html").as_uri())
    colours = _pixels(shot)
    for c in (trends.BAND, "#1565c0", "#c62828", trends.VERDICT_COLOURS["pass"]):
        assert _rgb(c) in colours, f"{c} not on the report's screenshot"
    dom = chromium(tmp_path, "--dump-dom", (run_dir / "report.html").as_uri()).stdout
    assert dom.count('class="run"') == 4 and 'class="band"' in dom
    page = run_dir / files.page_name("a/tp1-pp2-fp32")
    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri())
    assert _rgb("#b71c1c") in _pixels(shot)  # the failure's line, highlighted in the log


def test_the_accuracy_table_shows_a_layouts_paired_test_against_its_baseline():
    from servematrix.record import CheckResult, LoadResult, PairedResult, ScenarioRecord
    from servematrix.config.matrix import Expectation

    paired = PairedResult(test="ttest_rel", baseline="s/tp1-pp1-fp32", n=24, shift=0.3314, sigma=0.139,
                          p_value=3.64e-11, mde=0.0807, needed_n=3, status="fail")
    check = CheckResult(metric="gsm8k.nll", status="fail", measured=1.742, n=24, reference=1.4105, threshold=1.5636,
                        mde=0.2313, p_value=0.000184, effect=0.25, alpha=0.05, beta=0.2, paired=paired)
    r = ScenarioRecord(id="s/tp3-pp1-fp32", scenario="s", model="m", tp=3, pp=1, quant="fp32", vllm="current",
                       device="cpu", expect=Expectation(), verdict="fail", load=LoadResult(ok=True),
                       accuracy=[check], started_at="t", seconds=1)
    row = report_html.accuracy_rows(r)
    assert "paired vs baseline" in row and "ttest_rel p=3.64e-11, shift +0.3314 (MDE 0.0807): fail" in row
