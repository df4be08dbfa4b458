"""What the docker backend asks the Engine API for, derived from a launch spec."""

from pathlib import Path

from servematrix.serve.server import LaunchSpec
from servematrix.serve.docker import DEFAULT_IMAGE, DockerConfig, DockerServer, host_root_mounts


def spec(tmp_path, env=None):
    model = tmp_path / "model"
    model.mkdir()
    return LaunchSpec(argv=["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                            "--host", "127.0.0.1", "--port", "8123", "--tensor-parallel-size", "2"],
                      env=env or {}, port=8123, log_path=tmp_path / "run" / "server.log", startup_timeout=60)


def test_the_container_runs_the_images_python_with_the_model_read_only_and_the_run_dir_writable(tmp_path):
    kw = DockerServer(spec(tmp_path), DockerConfig(image="img:1", python="python3")).run_kwargs()
    assert kw["image"] == "img:1" and kw["command"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert kw["volumes"][str(tmp_path / "model")] == {"bind": str(tmp_path / "model"), "mode": "ro"}
    assert kw["volumes"][str(tmp_path / "run")]["mode"] == "rw"
    assert kw["network_mode"] == "host" and kw["shm_size"] == "4g" and "SYS_NICE" in kw["cap_add"]
    assert "device_requests" not in kw


def test_by_default_the_compose_cpu_image_runs_with_only_the_model_and_run_dir_mounted(tmp_path):
    import yaml

    kw = DockerServer(spec(tmp_path), DockerConfig()).run_kwargs()
    compose = yaml.safe_load((Path(__file__).parents[3] / "docker-compose.yml").read_text())
    # the image docker-compose.yml builds when CPU_IMAGE is unset (${CPU_IMAGE:-<default>})
    assert kw["image"] == DEFAULT_IMAGE and compose["services"]["vllm-cpu"]["image"].endswith(f":-{DEFAULT_IMAGE}}}")
    assert kw["command"][0] == "python3"
    assert set(kw["volumes"]) == {str(tmp_path / "model"), str(tmp_path / "run")}


def test_the_entrys_gpus_become_a_device_request_and_the_container_numbers_them_from_zero(tmp_path):
    kw = DockerServer(spec(tmp_path, {"CUDA_VISIBLE_DEVICES": "2,3", "VLLM_X": "1"}), DockerConfig()).run_kwargs()
    (req,) = kw["device_requests"]
    assert req["DeviceIDs"] == ["2", "3"] and req["Capabilities"] == [["gpu"]]
    assert kw["environment"] == {"VLLM_X": "1"}


def test_bridge_networking_listens_on_all_interfaces_and_publishes_the_port_on_loopback(tmp_path):
    kw = DockerServer(spec(tmp_path), DockerConfig(network="bridge")).run_kwargs()
    argv = kw["command"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert kw["ports"] == {"8123/tcp": ("127.0.0.1", 8123)} and "network_mode" not in kw


def test_extra_mounts_parse_host_container_and_mode(tmp_path):
    kw = DockerServer(spec(tmp_path), DockerConfig(mounts=["/data:/models:ro", "/x"])).run_kwargs()
    assert kw["volumes"]["/data"] == {"bind": "/models", "mode": "ro"}
    assert kw["volumes"]["/x"] == {"bind": "/x", "mode": "rw"}


def test_host_root_mounts_cover_python_venv_and_checkout_without_nesting():
    mounts = host_root_mounts(Path(__file__).resolve().parents[3])
    hosts = [m.split(":")[0] for m in mounts]
    assert "/usr" in hosts and all(m.endswith(":ro") for m in mounts)
    assert not any(a != b and a.startswith(b + "/") for a in hosts for b in hosts)


def test_an_environment_name_that_is_not_a_variable_name_is_refused(tmp_path):
    import pytest

    from servematrix.errors import ConfigError

    with pytest.raises(ConfigError):
        DockerServer(spec(tmp_path, {"A=B": "1"}), DockerConfig()).run_kwargs()


def test_the_containers_output_reaches_server_log_redacted_even_split_across_chunks(tmp_path):
    from servematrix import redact

    redact.forget()
    try:
        s = spec(tmp_path)
        s = LaunchSpec(argv=[*s.argv, "--api-key", "sk-docker-5772"], port=s.port, log_path=s.log_path,
                       startup_timeout=60)
        server = DockerServer(s, DockerConfig())

        class Container:
            def logs(self, stream, follow):
                return iter([b"non-default args: {'api_key': ['sk-doc", b"ker-5772']}\nRuntimeError: sk-docker-5772"])

        server.container = Container()
        s.log_path.parent.mkdir(parents=True)
        server._stream_log()
        assert s.log_path.read_text() == "non-default args: {'api_key': ['***']}\nRuntimeError: ***"
    finally:
        redact.forget()
