"""References as data: the protocol fingerprint and paired spread they carry, files written before
fingerprints still read, and `reference record` refusing a reference that would make its own check
uninformative (nothing written)."""

from __future__ import annotations

import textwrap

import pytest

from servematrix.cli import main
from servematrix.check.accuracy import reference_from
from servematrix.config.references import RefKey, References, dump_references
from servematrix.errors import ConfigError
from servematrix.record import (CheckResult, Expected, Gsm8kResult, MetricValue, PairedResult, Protocol, RunSummary,
                                ScenarioRecord)

KEY = RefKey(scenario="smollm2-135m", quant="fp32", tp=3, vllm="==0.32.0")
PROTOCOL = Protocol(dataset="d" * 16, question_ids="0-23", n=24, fewshot_ids=["67356bef"], template="t" * 16,
                    max_gen_toks=256, temperature=0.0, stop=["Question:"], seed=0, tokenizer="k" * 16,
                    lm_eval="0.4.13", servematrix="0.1.0")


def record(metrics: dict[str, MetricValue], checks: list[CheckResult], protocol=PROTOCOL) -> ScenarioRecord:
    g = Gsm8kResult(strict=0.0, strict_stderr=0.0, flexible=0.0, flexible_stderr=0.0, n=24, seconds=1.0,
                    protocol=protocol)
    return ScenarioRecord(id="smollm2-135m/tp3-pp1-fp32", scenario="smollm2-135m", model="m", tp=3, pp=1,
                          quant="fp32", vllm="current", device="cpu", expect=Expected(), verdict="pass",
                          started_at="t", seconds=1.0, gsm8k=g, metrics=metrics, accuracy=checks)


def check_result(metric, **fields):
    return CheckResult(metric=metric, status="pass", effect=0.15, alpha=0.05, beta=0.2, **fields)


NLL = MetricValue(mean=1.41, sigma=0.32, stderr=0.066, n=24)
ZERO = MetricValue(mean=0.0, sigma=0.0, stderr=0.0, n=24)


def test_a_file_written_before_fingerprints_still_reads_without_one(write):
    path = write("references/old.yaml", textwrap.dedent("""\
        references:
          - key: {scenario: smollm2-135m, quant: fp32, tp: 1}
            metric: gsm8k.nll
            mean: 1.41
            sigma: 0.32
            n: 24
    """))
    (ref,) = References.load(path.parent).refs
    assert ref.protocol is None and ref.paired_sigma is None


def test_a_recorded_reference_carries_the_records_protocol_and_paired_spread_and_reads_back(write):
    pair = PairedResult(test="ttest_rel", baseline="smollm2-135m/tp1-pp1-fp32", n=24, shift=1e-7, sigma=2e-6,
                        p_value=0.9, mde=0.01, needed_n=1, status="pass")
    rec = record({"gsm8k.nll": NLL}, [check_result("gsm8k.nll", paired=pair)])
    ref = reference_from("gsm8k.nll", NLL, KEY, "reports/gate-A", rec)
    assert ref.protocol == PROTOCOL and ref.paired_sigma == 2e-6
    path = write("references/gsm8k.yaml", dump_references([ref]))
    (back,) = References.load(path.parent).refs
    assert back.protocol == PROTOCOL and back.paired_sigma == 2e-6 and back.mean == NLL.mean


def test_recording_a_reference_that_makes_its_own_check_uninformative_is_refused():
    rec = record({"gsm8k.flexible": ZERO}, [check_result("gsm8k.flexible")])
    with pytest.raises(ConfigError) as info:
        reference_from("gsm8k.flexible", ZERO, KEY, "reports/gate-A", rec)
    msg = str(info.value)
    assert msg.startswith("scenarios/smollm2-135m.yaml: accuracy.checks (gsm8k.flexible): smollm2-135m/tp3-pp1-fp32 "
                          "of run reports/gate-A: gsm8k.flexible can never fail")
    assert "nothing recorded" in msg and "\n" not in msg
    # a metric no check guards is recorded as it is (its number is kept, nothing is gated on it)
    assert reference_from("gsm8k.strict", ZERO, KEY, "reports/gate-A", rec).mean == 0.0


def test_reference_record_refuses_the_run_and_leaves_the_file_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = record({"gsm8k.nll": NLL, "gsm8k.flexible": ZERO}, [check_result("gsm8k.flexible")])
    summary = RunSummary(matrix="m", run_dir=str(run_dir), host="h", vllm_version="0.32.0", torch_version="t",
                         servematrix_version="0.1.0", started_at="t", status="complete", scenarios=[rec])
    (run_dir / "summary.json").write_text(summary.model_dump_json())
    out = tmp_path / "refs.yaml"
    out.write_text("references: []\n")
    assert main(["reference", "record", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gsm8k.flexible can never fail" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "references: []\n"

