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
