"""The launch lifecycle with real child processes: a server that dies is a load failure at once
(never a wait for the timeout), a hung one times out, a busy port is refused before spawning, and
teardown removes the whole process group."""

import socket
import sys
import time

import psutil
import pytest

from servematrix.launch import LaunchSpec, LocalServer, ServerFailed, build_spec, cpu_bind


def spec(tmp_path, code, timeout=30.0, port=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    return LaunchSpec(argv=[sys.executable, "-c", code], port=port or free,
                      log_path=tmp_path / "server.log", startup_timeout=timeout)


def test_a_server_that_dies_is_a_load_failure_within_a_second_not_at_the_timeout(tmp_path):
    code = "import sys, time; time.sleep(0.5); print(\"KeyError: 'layers.0.self_attn.qkv_proj.k_scale'\"); sys.exit(1)"
    t0 = time.monotonic()
    with pytest.raises(ServerFailed) as info:
        with LocalServer(spec(tmp_path, code, timeout=120)):
            pass
    assert time.monotonic() - t0 < 5
    assert info.value.failure.signature == "KeyError: 'layers.0.self_attn.qkv_proj.k_scale'"
    assert info.value.seconds is not None and info.value.seconds < 5


def test_a_hung_server_times_out_and_its_process_group_is_killed(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"
    server = LocalServer(spec(tmp_path, code, timeout=2))
    with pytest.raises(ServerFailed) as info:
        server.__enter__()
    assert info.value.failure.kind == "timeout" and info.value.failure.infra
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(300)" in " ".join(p.info["cmdline"] or [])]


def test_a_busy_port_is_refused_before_spawning(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = LocalServer(spec(tmp_path, "print('never runs')", port=port))
        with pytest.raises(ServerFailed) as info:
            server.__enter__()
    assert info.value.failure.kind == "port-in-use" and info.value.failure.infra
    assert server.proc is None


def test_a_healthy_server_is_returned_and_torn_down_on_exit(tmp_path):
    code = ("import http.server, sys\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers()\n"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    sp = spec(tmp_path, code)
    sp = sp.model_copy(update={"argv": [*sp.argv, str(sp.port)]})
    with LocalServer(sp) as server:
        assert server.alive() and server.healthy_at >= server.started_at
        pid = server.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_cpu_bind_splits_cores_evenly_between_ranks():
    assert cpu_bind(2, [0, 1]) == "0|1"
    assert cpu_bind(2, [0, 1, 2, 3]) == "0-1|2-3"
    assert cpu_bind(3, [0, 1]) == "0|1|0"  # oversubscribed round-robin


def test_server_command_carries_layout_quant_and_device_env():
    from pathlib import Path

    from servematrix.matrix import load_matrix

    root = Path(__file__).resolve().parents[2]
    m = load_matrix(root / "matrix" / "cpu-smoke.yaml")
    e = next(x for x in m.entries if x.tp == 2)
    s = build_spec(e, m.scenario(e.scenario), "/ckpt", 8000, Path("log"), "python")
    assert s.argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 1" in " ".join(s.argv)
    assert "--dtype float32" in " ".join(s.argv)
    assert s.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "|" in s.env["VLLM_CPU_OMP_THREADS_BIND"]
