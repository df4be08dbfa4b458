"""vLLM's Transformers-backend sequence classifier as a sweep cell on real vLLM (the CPU build): through
Qwen2ForSequenceClassification's twin with --model-impl transformers the cell fails on vLLM's unmapped
`score` head (docs/sweep-triage.md), and the same load check with the fix module
transformers-seqcls-score in every rank loads it, the twin's score.weight bit for bit in the classifier."""

import json
import shlex
import sys
from pathlib import Path

import pytest

from .conftest import sweep, twin_of

pytestmark = pytest.mark.integration
CELL = "TransformersForSequenceClassification/tp1-none"


def test_the_score_head_fails_the_wrapper_cell_and_loads_with_the_fix_module(tmp_path, shared_cache):
    from servematrix.serve import loadcheck
    from servematrix.serve.server import LaunchSpec
    from servematrix.sweep import pooling

    proc, by_id = sweep(tmp_path / "run", "tp1", "TransformersForSequenceClassification/*", shared_cache)
    record = by_id[CELL]
    assert record["verdict"] == "fail", proc.stderr[-3000:]
    assert "There is no module or parameter named 'score'" in record["failure"]["signature"]
    argv = shlex.split(record["server_command"])
    argv = argv[argv.index("--model"):]  # the server's arguments, after the worker's own flags
    report = tmp_path / "fixes.jsonl"
    spec = LaunchSpec(argv=[sys.executable, "-m", loadcheck.SERVER_MODULE, *argv],
                      env={"VLLM_CPU_KVCACHE_SPACE": "1", "SERVEMATRIX_FIXES": "transformers-seqcls-score",
                           "SERVEMATRIX_FIX_REPORT": str(report)},
                      port=0, log_path=tmp_path / "check.log", startup_timeout=150)
    result = loadcheck.run(spec, loadcheck.Check(attention={}, out=tmp_path / "check"))
    assert result.ok, (tmp_path / "check.log").read_text()[-3000:]
    assert {r.model for r in result.ranks} == {"TransformersForSequenceClassification"}
    assert {json.loads(x)["status"] for x in report.read_text().splitlines()} == {"applied"}
    heads = {h.name: h for h in pooling.head_loaded(twin_of(record), tmp_path / "check")}
    assert heads["score.weight"].loaded and heads["score.weight"].param == "classifier.weight"
