"""What a run writes, and how often: an entry no host can run is recorded (record.json) at once,
but the run-wide reports are rewritten once for all such entries, not once per entry (a run of
1,000 skipped entries was quadratic: 691 records after 300 s); a credential a scenario gives its
server and the user writes again in an xfail reason or signature is stored nowhere."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from servematrix.config.matrix import load_matrix
from servematrix.run import lifecycle as lifecycle_mod
from servematrix.run.options import RunOptions
from servematrix.run.session import Session
from servematrix.serve import envs, hardware
from tests.unit.run.doubles import ScriptedPipeline

SCENARIO = """\
name: sec
model:
  path: /nonexistent
server:
  env: {HF_TOKEN: hf_SuperSecret1234}
  args: [--api-key, sk-flagsecret99]
quants:
  fp32: {args: [--dtype, float32]}
smoke:
  prompts:
    - {name: p, prompt: "hi"}
"""


@pytest.fixture(autouse=True)
def _no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(envs, "probe", lambda python: {"vllm": "0.32.0", "torch": "2.13.0"})
    monkeypatch.setattr(hardware, "probe_gpus", lambda: [])
    monkeypatch.setattr(hardware, "host_gpus", lambda ids: [])


def gpu_matrix(tmp_path: Path, n: int, include: str = ""):
    (tmp_path / "scenarios").mkdir(exist_ok=True)
    (tmp_path / "scenarios" / "sec.yaml").write_text(SCENARIO)
    tps = ", ".join(str(i) for i in range(1, n + 1)) if n else "1"
    path = tmp_path / "m.yaml"
    path.write_text(f"name: m\nscenario_dir: scenarios\nreferences_dir: none\n"
                    f"scenarios: [{'sec' if n else ''}]\naxes:\n  tp: [{tps}]\n  device: [gpu]\n{include}")
    return load_matrix(path)


N = 200  # enough to tell a constant number of rewrites from one per entry; each entry's record.json is fsynced


def test_many_skipped_entries_write_the_reports_a_constant_number_of_times(tmp_path, monkeypatch):
    matrix = gpu_matrix(tmp_path, N)
    calls = []
    real = lifecycle_mod.write_all

    def counted(summary, trend=None, pages_of=None):
        calls.append(None if pages_of is None else len(list(pages_of)))
        return real(summary, trend, pages_of)

    monkeypatch.setattr(lifecycle_mod, "write_all", counted)  # the run lifecycle writes the reports
    t0 = time.monotonic()
    summary = Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run"), pipeline=ScriptedPipeline(matrix)).run()
    took = time.monotonic() - t0

    assert summary.counts == {"skipped": N} and summary.exit_code == 2
    assert len(calls) <= 4, calls  # the start, the skipped at once, the end (and the end with the trend)
    assert N in calls  # the one write for the skipped entries wrote their pages
    run = tmp_path / "run"
    assert len(list(run.rglob("record.json"))) == N and len(list(run.glob("scenario-*.html"))) == N
    assert len(json.loads((run / "summary.json").read_text())["scenarios"]) == N
    assert took < 60, f"{took:.0f} s for {N} skipped entries"


def test_a_scenario_credential_written_again_in_a_waiver_is_stored_nowhere(tmp_path):
    include = ("include:\n  - scenario: sec\n    device: gpu\n    tp: 2\n    expect: xfail\n"
               "    reason: 'fails with token hf_SuperSecret1234 and key sk-flagsecret99'\n"
               "    bug: 'https://alice:pw0rdSecret@github.com/x/y/issues/1'\n"
               "    signature: 'hf_SuperSecret1234|sk-flagsecret99'\n")
    matrix = gpu_matrix(tmp_path, 1, include)
    Session.of(matrix, matrix.entries, RunOptions.of(tmp_path / "run"), pipeline=ScriptedPipeline(matrix)).run()

    written = {p: p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert any(p.name == "record.json" for p in written) and any(p.name == "outcome.json" for p in written)
    assert any(p.name.startswith("scenario-") for p in written)
    for path, text in written.items():
        for secret in ("hf_SuperSecret1234", "sk-flagsecret99", "pw0rdSecret"):
            assert secret not in text, f"{secret} in {path}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reasons = [r["expect"]["reason"] for r in summary["scenarios"] if r["expect"]["expect"] == "xfail"]
    assert reasons == ["fails with token *** and key ***"]
