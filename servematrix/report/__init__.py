"""Report: summary.json, load-success.md, accuracy.md, junit.xml and report.html for one run
directory, rewritten atomically after every scenario so a killed run keeps what it finished. The
writers are siblings that only read the summary (files, grid, markdown, junit, html); history,
gate and comparison read finished runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from servematrix.record import RunSummary
from servematrix.report import html, junit, markdown, pages
from servematrix.files import atomic_write


def write_all(summary: RunSummary, trend: dict | None = None, pages_of: Iterable[str] | None = None) -> None:
    """Every report of the run. `pages_of`: the ids whose scenario page changed (a run rewrites the
    reports per record: rewriting all N pages each time made a run of N entries write N² pages —
    1,000 skipped entries took minutes); None rewrites every page."""
    out = Path(summary.run_dir)
    atomic_write(out / "summary.json", summary.model_dump_json(indent=2))
    atomic_write(out / "load-success.md", markdown.load_success_md(summary))
    atomic_write(out / "accuracy.md", markdown.accuracy_md(summary))
    atomic_write(out / "junit.xml", junit.junit_xml(summary))
    atomic_write(out / "report.html", html.render(summary, trend))
    pages.write_pages(summary, trend, pages_of)  # scenario-<id>.html beside report.html
