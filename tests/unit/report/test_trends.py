"""Trend charts split at a protocol change: points measured under two protocols (fingerprint, or n
where the run's record is gone) are never joined by one line — measured, reference, threshold or
band — and one protocol stays one series."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from servematrix.check.accuracy import judge
from servematrix.config.references import Check, RefKey, Reference
from servematrix.record import Expected, Gsm8kResult, MetricValue, Protocol, RunSummary, ScenarioRecord
from servematrix.report import trends

SID = "s/tp1-pp1-fp32"
NS = "{http://www.w3.org/2000/svg}"
REF = Reference(key=RefKey(scenario="s", quant="fp32"), metric="gsm8k.nll", mean=1.41, sigma=0.32, n=24)


def protocol(n=24, **changes) -> Protocol:
    base = dict(dataset="d" * 16, question_ids=f"0-{n - 1}", n=n, fewshot_ids=["a"], template="t" * 16,
                max_gen_toks=256, temperature=0.0, stop=["Question:"], seed=0, tokenizer="k" * 16,
                lm_eval="0.4.13", servematrix="0.1.0")
    return Protocol(**{**base, **changes})


def run(tmp_path, i: int, mean: float, n: int, proto: Protocol | None, verdict="pass") -> dict:
    """One history row of SID, and its run's summary.json (holding the record's fingerprint) where
    `proto` is given; without one the run directory does not exist (moved, or a CI artifact gone)."""
    run_dir = tmp_path / f"run{i}"
    if proto is not None:
        g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=n, seconds=1.0,
                        protocol=proto)
        r = ScenarioRecord(id=SID, scenario="s", model="m", tp=1, pp=1, quant="fp32", vllm="current", device="cpu",
                           expect=Expected(), verdict=verdict, started_at="t", seconds=1.0, gsm8k=g)
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(RunSummary(
            matrix="m", run_dir=str(run_dir), host="h", vllm_version="0.32.0", torch_version="t",
            servematrix_version="0.1.0", started_at="t", scenarios=[r]).model_dump_json())
    check = judge(Check(metric="gsm8k.nll", effect=0.25), MetricValue(mean=mean, sigma=0.32, stderr=0.07, n=n), REF)
    return {"verdict": verdict, "started_at": f"2026-12-0{i + 1}T01:00:00", "run_dir": str(run_dir),
            "metrics": {"gsm8k.nll": {"mean": mean, "sigma": 0.32, "stderr": 0.07, "n": n}},
            "accuracy": [check.model_dump()]}


def svg(rows) -> ET.Element:
    return ET.fromstring(trends.charts(rows, scenario=SID))


def xs(el: ET.Element) -> list[float]:
    return [float(p.split(",")[0]) for p in el.get("points").split()]


def protocols_under(root: ET.Element, lo: float, hi: float) -> set[str]:
    """The protocols of the runs drawn between x = lo and x = hi."""
    return {c.get("data-protocol") for c in root.iter(f"{NS}circle") if lo - 0.05 <= float(c.get("cx")) <= hi + 0.05}


def lines_of(root: ET.Element, kind: str) -> list[ET.Element]:
    return [el for el in root.iter() if el.get("class") == kind]


def assert_no_line_joins_two_protocols(root: ET.Element) -> None:
    for el in lines_of(root, "measured"):
        assert protocols_under(root, min(xs(el)), max(xs(el))) >= {el.get("data-protocol")}
        assert {c.get("data-protocol") for c in root.iter(f"{NS}circle") if float(c.get("cx")) in xs(el)} \
            == {el.get("data-protocol")}
    for kind in ("reference", "threshold", "band"):
        for el in lines_of(root, kind):
            assert len(protocols_under(root, min(xs(el)), max(xs(el)))) == 1, kind


def test_a_protocol_change_splits_the_series_and_no_line_joins_its_points(tmp_path):
    # evidence/gate-2: the n=22 run (another question set) after n=24 runs
    rows = [run(tmp_path, 0, 1.41, 24, protocol()), run(tmp_path, 1, 1.74, 24, protocol(), "fail"),
            run(tmp_path, 2, 1.40, 24, protocol()), run(tmp_path, 3, 1.4287, 22, protocol(n=22))]
    root = svg(rows)
    measured = lines_of(root, "measured")
    assert [(m.get("data-protocol"), len(xs(m))) for m in measured] == [("n=24", 3), ("n=22", 1)]
    assert len({m.get("stroke") for m in measured}) == 2
    assert_no_line_joins_two_protocols(root)
    # a threshold at n=22 is another number: the threshold line does not slant from one to the other
    assert len(lines_of(root, "threshold")) == 2 and len(lines_of(root, "band")) == 2
    legend = [t for t in lines_of(root, "protocol")]
    assert [t.get("data-protocol") for t in legend] == ["n=24", "n=22"]
    change = lines_of(root, "protocol-change")
    assert len(change) == 1 and "question_ids 0-23 → 0-21; n 24 → 22" in change[0].find(f"{NS}title").text
    assert "4 runs · 2 protocols" in root.find(f"{NS}title").text


def test_one_protocol_stays_one_series_even_across_another(tmp_path):
    same = [run(tmp_path, i, 1.4 + i / 100, 24, protocol()) for i in range(4)]
    root = svg(same)
    (measured,) = lines_of(root, "measured")
    assert len(xs(measured)) == 4 and not lines_of(root, "protocol-change") and not lines_of(root, "protocol")
    assert "protocols" not in root.find(f"{NS}title").text
    # A B A: A's runs are one series (one line over both), B's its own; guard lines per stretch
    aba = [run(tmp_path, 4, 1.41, 24, protocol()), run(tmp_path, 5, 1.43, 22, protocol(n=22)),
           run(tmp_path, 6, 1.42, 24, protocol())]
    root = svg(aba)
    assert [(m.get("data-protocol"), len(xs(m))) for m in lines_of(root, "measured")] == [("n=24", 2), ("n=22", 1)]
    assert len(lines_of(root, "band")) == 3 and len(lines_of(root, "protocol-change")) == 2
    for kind in ("reference", "threshold", "band"):
        for el in lines_of(root, kind):
            assert len(protocols_under(root, min(xs(el)), max(xs(el)))) == 1


def test_two_fingerprints_of_one_n_are_two_series_told_apart_by_fingerprint(tmp_path):
    rows = [run(tmp_path, 0, 1.41, 24, protocol()), run(tmp_path, 1, 1.45, 24, protocol(max_gen_toks=512))]
    root = svg(rows)
    labels = [m.get("data-protocol") for m in lines_of(root, "measured")]
    assert len(labels) == 2 and len(set(labels)) == 2 and all(x.startswith("n=24 · ") for x in labels)
    assert "max_gen_toks 256 → 512" in lines_of(root, "protocol-change")[0].find(f"{NS}title").text
    assert_no_line_joins_two_protocols(root)


def test_without_a_fingerprint_the_runs_n_stands_for_its_protocol(tmp_path):
    # run directories gone (no summary.json): n alone splits them
    rows = [run(tmp_path, 0, 1.41, 24, None), run(tmp_path, 1, 1.42, 24, None), run(tmp_path, 2, 1.43, 22, None)]
    root = svg(rows)
    assert [(m.get("data-protocol"), len(xs(m))) for m in lines_of(root, "measured")] == [("n=24", 2), ("n=22", 1)]
    assert_no_line_joins_two_protocols(root)
    # a run without one joins the one fingerprinted protocol of its n (compared as before) ...
    old = [run(tmp_path, 3, 1.41, 24, None), run(tmp_path, 4, 1.42, 24, protocol())]
    assert [len(xs(m)) for m in lines_of(svg(old), "measured")] == [2]
    # ... and stays apart where two fingerprints share its n
    two = old + [run(tmp_path, 5, 1.43, 24, protocol(seed=1))]
    labels = [m.get("data-protocol") for m in lines_of(svg(two), "measured")]
    assert len(labels) == 3 and "n=24 · no fingerprint" in labels


def test_a_runs_fingerprint_is_read_from_its_summary_and_unknown_where_that_is_unreadable(tmp_path):
    row = run(tmp_path, 0, 1.41, 24, protocol())
    assert trends.fingerprint(row["run_dir"], SID) == protocol()
    assert trends.fingerprint(row["run_dir"], "other/tp1") is None and trends.fingerprint(None, SID) is None
    assert trends.fingerprint(str(tmp_path / "gone"), SID) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    assert trends.fingerprint(str(bad), SID) is None
    (bad / "summary.json").write_text('{"scenarios": [{"id": "%s", "gsm8k": {"protocol": {"n": "x"}}}]}' % SID)
    assert trends.fingerprint(str(bad), SID) is None
