"""References as data: files written before fingerprints still read, and `reference record`
refusing a run whose reference would make its own check uninformative (nothing written). What
`check.accuracy.reference_from` puts in a reference is tested in tests/unit/check/test_accuracy.py."""

from __future__ import annotations

import textwrap

from servematrix.cli import main
from servematrix.config.references import References
from servematrix.record import RunSummary

from tests.unit.check.test_accuracy import NLL, ZERO, check_result, record


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
