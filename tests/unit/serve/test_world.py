"""The persistent worker's protocol, through a scripted double of zygote.py (a real child process
speaking the same files), and the zygote's own world logic with scripted ranks: a passing check, a
failing one classified from its log, a hang and a crash that cost their cell only (the worker is
killed and the next check gets a fresh one)."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from servematrix.record import StageFailed
from servematrix.serve import loadcheck
from servematrix.serve.server import LaunchSpec
from servematrix.serve import world as persistent, zygote

# The double: ready.json, then per request what its --model says (ok, fail, hang, crash).
DOUBLE = textwrap.dedent('''
    import json, os, sys, time
    d = sys.argv[1]
    json.dump({"pid": os.getpid()}, open(os.path.join(d, "ready.json"), "w"))
    n = 0
    while True:
        p = os.path.join(d, f"request-{n}.json")
        if not os.path.exists(p):
            time.sleep(0.01); continue
        req = json.load(open(p))
        argv = req["argv"]
        out = next(a.split("=", 1)[1] for a in argv if a.startswith("--loadcheck-out="))
        what = argv[argv.index("--model") + 1]
        with open(req["log"], "a") as log:
            log.write(f"worker pid {os.getpid()} env {req['env'].get('X')}\\n")
            if what == "fail":
                log.write("Traceback (most recent call last):\\nKeyError: 'layers.1.mlp.weight'\\n")
        if what == "hang":
            time.sleep(3600)
        if what == "crash":
            os._exit(9)
        ok = what == "ok"
        json.dump({"rank": 0, "ok": ok, "parameters": 3, "numel": 30}, open(os.path.join(out, "rank0.json"), "w"))
        json.dump({"codes": [0 if ok else 1], "seconds": 0.1}, open(os.path.join(d, f"response-{n}.json"), "w"))
        n += 1
''')


@pytest.fixture
def world(tmp_path):
    script = tmp_path / "double.py"
    script.write_text(DOUBLE)
    w = persistent.World(sys.executable, {}, tmp_path / "workers", script=script)
    yield w
    w.close()


def check(tmp_path, world, model, timeout=30.0, name=None):
    cell = tmp_path / (name or model)
    cell.mkdir()
    spec = LaunchSpec(argv=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model],
                      env={"X": "cell-env"}, port=0, log_path=cell / "server.log", startup_timeout=timeout)
    return persistent.run_check(world, spec, loadcheck.Check(out=cell / "loadcheck"))


def test_checks_share_one_worker_and_get_their_environment(tmp_path, world):
    a = check(tmp_path, world, "ok", name="a")
    b = check(tmp_path, world, "ok", name="b")
    assert a.ok and b.ok and a.ranks[0].parameters == 3 and world.starts == 1
    log = (tmp_path / "b" / "server.log").read_text()
    assert log.startswith("$ X=cell-env ") and "loadcheck_worker.py" in log.splitlines()[0]
    assert "env cell-env" in log


def test_a_failing_check_is_classified_from_its_log_and_the_worker_lives_on(tmp_path, world):
    with pytest.raises(StageFailed) as exc:
        check(tmp_path, world, "fail")
    assert exc.value.failure.kind == "exception" and exc.value.failure.signature == "KeyError: 'layers.1.mlp.weight'"
    assert exc.value.recorded["load_check"].ok is False
    assert check(tmp_path, world, "ok").ok and world.starts == 1


def test_a_hang_costs_its_cell_only_the_world_is_killed_and_restarted(tmp_path, world):
    assert check(tmp_path, world, "ok", name="before").ok
    pid = world.proc.pid
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as exc:
        check(tmp_path, world, "hang", timeout=1.0)
    assert exc.value.failure.kind == "timeout" and time.monotonic() - t0 < 10
    assert world.proc is None and not _alive(pid)
    assert check(tmp_path, world, "ok", name="after").ok and world.starts == 2


def test_a_crash_of_the_worker_costs_its_cell_only(tmp_path, world):
    with pytest.raises(StageFailed) as exc:
        check(tmp_path, world, "crash")
    assert exc.value.failure.kind == "signal" and "died" in exc.value.failure.signature
    assert check(tmp_path, world, "ok").ok and world.starts == 2


def test_a_worker_that_never_starts_is_the_cells_failure_not_a_traceback(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit('no vllm in this environment')\n")
    w = persistent.World(sys.executable, {}, tmp_path / "workers", script=script)
    with pytest.raises(StageFailed) as exc:
        check(tmp_path, w, "ok")
    assert "did not start" in exc.value.failure.signature


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_zygote_forks_a_world_and_a_failed_rank_ends_its_peers(tmp_path, monkeypatch):
    """zygote._world_run itself, its ranks scripted: rank 1 fails at once, rank 0 would wait on it
    forever (as a gloo peer does); both are reported and nothing is left running."""
    def rank(r, args, server_argv, port):
        Path(args.loadcheck_out, f"rank{r}.json").write_text(json.dumps({"rank": r, "port": port}))
        if r == 1:
            os._exit(1)
        time.sleep(3600)

    monkeypatch.setattr(zygote.lw, "_rank", rank)
    monkeypatch.setattr(zygote, "PEER_GRACE", 0.2)
    out = tmp_path / "out"
    request = {"argv": [f"--loadcheck-out={out}", "--tensor-parallel-size", "2"], "log": str(tmp_path / "log"),
               "env": {}}
    t0 = time.monotonic()
    answer = zygote._world_run(request, 0)
    assert answer["codes"] == [-9, 1] and time.monotonic() - t0 < 10
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json", "rank1.json"]


def test_a_runs_worlds_are_one_per_release_and_close_ends_them(tmp_path):
    """Worlds (the pipeline's load checks): checks of one release share its worker, another release
    gets its own, and close() leaves no worker running."""
    script = tmp_path / "double.py"
    script.write_text(DOUBLE)
    worlds = persistent.Worlds(tmp_path / "worlds", script=script)

    def pid_of(release: str, name: str) -> int:
        cell = tmp_path / name
        cell.mkdir()
        spec = LaunchSpec(argv=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "ok"],
                          env={"X": name}, port=0, log_path=cell / "server.log", startup_timeout=30)
        assert worlds.check(release, spec, loadcheck.Check(out=cell / "loadcheck"), {}).ok
        line = next(x for x in (cell / "server.log").read_text().splitlines() if x.startswith("worker pid"))
        assert line.endswith(f"env {name}")  # the check's own environment reached it
        return int(line.split()[2])

    a1, a2, b = pid_of("cpu-0.20.2-cpu", "a1"), pid_of("cpu-0.20.2-cpu", "a2"), pid_of("current-cpu", "b")
    assert a1 == a2 != b
    worlds.close()
    time.sleep(0.2)
    assert not _alive(a1) and not _alive(b)


def test_a_world_in_a_reused_run_directory_answers_from_its_own_checks_not_the_earlier_runs(tmp_path):
    """`--overwrite` keeps the run directory: an earlier world's ready.json, requests and responses
    must not answer (or be run by) the new world's checks."""
    script = tmp_path / "double.py"
    script.write_text(DOUBLE)
    first = persistent.World(sys.executable, {}, tmp_path / "workers", script=script)
    with pytest.raises(StageFailed):
        check(tmp_path, first, "fail", name="first")
    first.close()
    stale = tmp_path / "workers" / "worker-1"
    assert (stale / "response-0.json").exists() and (stale / "request-0.json").exists()
    second = persistent.World(sys.executable, {}, tmp_path / "workers", script=script)
    try:
        assert check(tmp_path, second, "ok", name="second").ok  # the stale response said code 1
        assert "KeyError" not in (tmp_path / "second" / "server.log").read_text()
    finally:
        second.close()
