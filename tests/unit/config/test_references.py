"""References as data: files written before fingerprints still read, and `reference record`
refusing a run whose reference would make its own check uninformative (nothing written). What
`check.accuracy.reference_from` puts in a reference is tested in tests/unit/check/test_accuracy.py."""

from __future__ import annotations

import textwrap

import pytest

from servematrix.cli import main
from servematrix.config.references import References
from servematrix.config.yamlio import ConfigError
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


def _one(mean: float) -> str:
    return ("references:\n  - key: {scenario: smollm2-135m, quant: fp32, tp: 1}\n"
            f"    metric: gsm8k.nll\n    mean: {mean}\n    sigma: 0.32\n    n: 24\n")


def test_an_edited_references_file_is_read_again_and_a_copy_elsewhere_reads_the_same(write, tmp_path):
    path = write("references/gsm8k.yaml", _one(1.41))
    assert [r.mean for r in References.load(path.parent).refs] == [1.41]
    path.write_text(_one(1.52))  # parsed once per content: an edit is never served from the cache
    assert [r.mean for r in References.load(path.parent).refs] == [1.52]
    copy = tmp_path / "elsewhere" / "gsm8k.yaml"
    copy.parent.mkdir()
    copy.write_text(_one(1.52))
    assert References.load(copy.parent).refs == References.load(path.parent).refs


def test_a_broken_references_file_names_its_own_line_every_time_it_is_loaded(write, tmp_path):
    good = write("references/gsm8k.yaml", _one(1.41))
    References.load(good.parent)
    for where in ("a", "b"):  # the same broken bytes in two places: each error names its own file
        broken = tmp_path / where / "gsm8k.yaml"
        broken.parent.mkdir()
        broken.write_text(_one(1.41).replace("sigma: 0.32", "sigma: -1"))
        with pytest.raises(ConfigError, match=f"^{broken}:5: references.0.sigma"):
            References.load(broken.parent)
