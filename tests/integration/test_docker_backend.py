"""`--backend docker` in its developer mode ("host-root", serve.docker.host_root_mounts) against a
real engine: Podman's Docker-compatible API (no Docker engine runs here). The containers run real
vLLM (the CPU build of this venv, mounted read-only into an image that holds only a root skeleton),
so the backend's lifecycle is tested in seconds of image work; the runner talks to them exactly as to
local servers. The default mode, the real image with vLLM inside, is tested in test_containers.py."""

import json
import subprocess

import pytest

from servematrix.serve.docker import host_root_mounts

from .conftest import REPO, servematrix

pytestmark = pytest.mark.integration


def docker_args(image: str) -> list[str]:
    import sys

    args = ["--backend", "docker", "--docker-image", image, "--docker-python", sys.executable]
    for m in host_root_mounts(REPO):
        args += ["--docker-mount", m]
    return args


def leftover_containers(env: dict) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", "label=servematrix=server", "--format", "{{.Names}}"],
                         capture_output=True, text=True, env=env)
    return out.stdout.split()


def test_docker_backend_serves_tp1_and_tp2_in_containers_with_parity_and_removes_them(tmp_path, shared_cache,
                                                                                      podman_engine):
    env, image = podman_engine
    out = tmp_path / "run"
    proc = servematrix("run", "matrix/cpu-smoke.yaml", "-k", "tiny-llama/tp1-pp1-fp32,tiny-llama/tp2-pp1-fp32",
                       "--no-gsm8k", "--out", str(out), *docker_args(image),
                       env={"SERVEMATRIX_CACHE": shared_cache, **env}, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_id = {r["id"]: r for r in json.loads((out / "summary.json").read_text())["scenarios"]}
    assert {k: r["verdict"] for k, r in by_id.items()} == {"tiny-llama/tp1-pp1-fp32": "pass",
                                                           "tiny-llama/tp2-pp1-fp32": "pass"}
    assert by_id["tiny-llama/tp2-pp1-fp32"]["smoke"]["parity"]["ok"] is True
    log = (out / "tiny-llama/tp2-pp1-fp32/server.log").read_text()
    assert "# servematrix (docker localhost/servematrix-hostroot:test)" in log
    assert "vllm" in log.lower() and "tensor_parallel_size=2" in log.replace(" ", "")
    assert leftover_containers(env) == []


def test_a_server_dying_in_its_container_is_a_load_failure_with_its_signature(tmp_path, shared_cache,
                                                                              podman_engine):
    env, image = podman_engine
    out = tmp_path / "run"
    proc = servematrix("run", "matrix/broken.yaml", "--out", str(out), *docker_args(image),
                       env={"SERVEMATRIX_CACHE": shared_cache, **env}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert r["verdict"] == "xfail" and r["load"]["ok"] is False
    assert "exceeds dimension size" in r["failure"]["signature"]
    assert leftover_containers(env) == []
