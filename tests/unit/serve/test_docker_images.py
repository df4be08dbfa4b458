"""The images the docker backend and compose run fit together: docker/Dockerfile.runner builds FROM the
CPU server image compose's vllm-cpu builds and `--backend docker` runs, and carries what a run reads."""

import re
from pathlib import Path

import yaml

from servematrix.serve.docker import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[3]


def arg_default(dockerfile: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", (REPO / dockerfile).read_text(), flags=re.M)
    return value


def test_the_runner_builds_from_the_cpu_server_image_by_default_and_with_cpu_image_set():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    # one variable names the server image everywhere: compose's server, the runner's base, the backend
    assert services["vllm-cpu"]["image"] == f"${{CPU_IMAGE:-{DEFAULT_IMAGE}}}"
    assert services["runner"]["build"]["args"]["BASE"] == f"${{RUNNER_BASE:-${{CPU_IMAGE:-{DEFAULT_IMAGE}}}}}"
    assert arg_default("docker/Dockerfile.runner", "BASE") == DEFAULT_IMAGE


def test_the_runner_image_carries_the_matrix_scenario_and_reference_files_a_run_reads():
    copied = re.findall(r"^COPY (\S+) /work/\1$", (REPO / "docker/Dockerfile.runner").read_text(), flags=re.M)
    matrix = yaml.safe_load((REPO / "matrix/cpu-smoke.yaml").read_text())
    scenario_dir = (REPO / "matrix" / matrix.get("scenario_dir", "../scenarios")).resolve()
    assert {"matrix", scenario_dir.name, "references"} <= set(copied)
    assert all((REPO / d).is_dir() for d in copied)
