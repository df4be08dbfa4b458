"""GPU conditions as data: which nightly-gpu entries a host runs, and why it skips the rest."""

from pathlib import Path

import pytest

from servematrix.gpus import Gpu, parse_nvidia_smi
from servematrix.serve.hardware import unmet
from servematrix.config.matrix import load_matrix
from servematrix.config.scenario import Requires
from servematrix.check.verdict import exit_code

REPO = Path(__file__).resolve().parents[3]
H100 = [Gpu(index=i, name="NVIDIA H100 80GB HBM3", memory_gb=79.6, capability=9.0) for i in range(8)]
H200 = [Gpu(index=i, name="NVIDIA H200", memory_gb=139.8, capability=9.0) for i in range(8)]


def test_nvidia_smi_csv_is_parsed_into_gpus():
    text = "0, NVIDIA H100 80GB HBM3, 81559, 9.0\n1, NVIDIA H100 80GB HBM3, 81559, 9.0\n"
    gpus = parse_nvidia_smi(text)
    assert [(g.index, g.capability, g.memory_gb) for g in gpus] == [(0, 9.0, 79.6), (1, 9.0, 79.6)]


def test_an_entry_fits_when_enough_gpus_meet_every_requirement():
    assert unmet(2, Requires(gpu_capability=8.9), H100) is None
    assert unmet(0, Requires(gpu_capability=12.0), []) is None  # a CPU entry needs no GPU


def test_the_reason_names_what_is_missing_and_what_the_host_has():
    why = unmet(2, Requires(gpu_capability=10.0), H100[:2])
    assert "compute capability >= 10.0" in why and "0 that qualify" in why and "H100" in why
    assert "no GPU" in unmet(1, Requires(), [])


def test_quant_requirements_tighten_the_scenarios():
    merged = Requires(gpu_memory_gb=80).merge(Requires(gpu_capability=10.0))
    assert (merged.gpu_capability, merged.gpu_memory_gb) == (10.0, 80)


@pytest.fixture(scope="module")
def gpu_matrix():
    return load_matrix(REPO / "matrix/nightly-gpu.yaml")


def _runnable(matrix, gpus):
    out = set()
    for e in matrix.entries:
        scn = matrix.scenario(e.scenario)
        if unmet(e.tp * e.pp, scn.requirements(e.quant), gpus) is None:
            out.add(e.id)
    return out


def test_nightly_gpu_matrix_validates_and_covers_every_seed_configuration(gpu_matrix):
    ids = {e.id for e in gpu_matrix.entries}
    assert {"minimax-m2.5-nvfp4/tp2-pp1-nvfp4-gpu", "deepseek-v3.2-fp8/tp8-pp1-fp8-gpu",
            "minimax-m2/tp16-pp1-fp8-gpu", "minicpm-v-4/tp1-pp1-fp8-online-gpu",
            "glm-5.1-fp8/tp1-pp8-fp8-gpu"} <= ids
    assert all(e.device == "gpu" for e in gpu_matrix.entries)
    layouts = {(e.tp, e.pp) for e in gpu_matrix.entries if e.scenario.startswith("qwen")}
    assert {(1, 1), (2, 1), (4, 1), (1, 2)} <= layouts
    quants = {e.quant for e in gpu_matrix.entries if e.scenario.startswith("qwen")}
    assert {"fp8", "awq", "gptq"} <= quants


def test_an_8xh100_host_skips_blackwell_fp4_and_the_h200_sized_models(gpu_matrix):
    run = _runnable(gpu_matrix, H100)
    assert "qwen3-0.6b/tp4-pp1-fp8-gpu" in run and "minicpm-v-4/tp1-pp1-fp8-online-gpu" in run
    assert "minimax-m2.5-nvfp4/tp2-pp1-nvfp4-gpu" not in run  # NVFP4 needs sm 10.0
    assert "glm-5.1-fp8/tp1-pp8-fp8-gpu" not in run  # 139 GB per GPU
    assert "minimax-m2/tp16-pp1-fp8-gpu" not in run  # 16 GPUs: two nodes


def test_an_8xh200_host_runs_the_dsa_models_but_not_the_16_gpu_layout(gpu_matrix):
    run = _runnable(gpu_matrix, H200)
    assert {"glm-5.1-fp8/tp1-pp8-fp8-gpu", "deepseek-v3.2-fp8/tp4-pp2-fp8-gpu"} <= run
    assert "minimax-m2/tp16-pp1-fp8-gpu" not in run


def test_a_run_where_every_entry_was_skipped_cannot_ship():
    assert exit_code(["skipped", "skipped"]) == 2
    assert exit_code(["pass", "skipped"]) == 0


def test_running_the_gpu_matrix_on_a_host_without_gpus_skips_every_entry_with_its_reason(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "servematrix.cli", "run", "matrix/nightly-gpu.yaml",
                           "--gpus", "0,1", "-k", "qwen3-0.6b/tp*-pp1-bf16*,glm", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {r["id"]: (r["verdict"], r["note"]) for r in summary["scenarios"]}
    # --gpus names two GPUs this host cannot probe: what fits in two is dispatched (and fails to
    # find a GPU, or the model), what needs more is skipped before anything starts
    assert verdicts["qwen3-0.6b/tp4-pp1-bf16-gpu"][0] == "skipped"
    assert "needs 4 GPUs" in verdicts["qwen3-0.6b/tp4-pp1-bf16-gpu"][1]
    assert "needs 8 GPUs" in verdicts["glm-5.1-fp8/tp1-pp8-fp8-gpu"][1]
    assert "skipped" in (out / "load-success.md").read_text() or "–" in (out / "load-success.md").read_text()
    assert proc.returncode != 0
