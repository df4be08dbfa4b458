"""A fix module reaches every vLLM process through the `vllm.general_plugins` entry point, each
process reports what it did, and a corruption that loads fine is caught by TP parity.

The module used is `inject-scale`, servematrix's fault injector (it scales one weight tensor as
vLLM loads it): applied at TP=2 only, it makes the greedy output disagree with the TP=1 baseline."""

import json
import textwrap

import pytest

from .conftest import REPO, servematrix

pytestmark = pytest.mark.integration


def test_fix_module_applies_in_every_process_and_parity_catches_the_corruption(tmp_path, shared_cache):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(textwrap.dedent(f"""\
        name: fix-plugin
        scenario_dir: {REPO / 'scenarios'}
        gsm8k: {{enabled: false}}
        include:
          - scenario: tiny-llama
          - scenario: tiny-llama
            tp: 2
            fixes: [inject-scale]
            expect: xfail
            reason: deliberate fault injected at load time
            bug: https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/models/llama.py
            signature: "parity with tiny-llama/tp1-pp1-fp32"
    """))
    out = tmp_path / "run"
    proc = servematrix("run", str(matrix), "--out", str(out),
                       env={"SERVEMATRIX_CACHE": shared_cache,
                            "SERVEMATRIX_INJECT_SCALE": "model.layers.0.mlp.down_proj.weight:-3.0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base, injected = json.loads((out / "summary.json").read_text())["scenarios"]
    assert base["fixes"] == [] and base["verdict"] == "pass"
    assert injected["id"] == "tiny-llama/tp2-pp1-fp32+inject-scale"
    assert injected["verdict"] == "xfail" and injected["load"]["ok"] is True
    statuses = {(f["name"], f["status"]) for f in injected["fixes"]}
    assert statuses == {("inject-scale", "applied")}
    # API server, engine core and both TP workers each loaded the plugin
    assert len({f["pid"] for f in injected["fixes"]}) >= 4
