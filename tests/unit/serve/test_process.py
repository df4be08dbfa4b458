"""process.spawn runs every child under the reaper: the child's exit is the caller's to see, and
nothing of its tree outlives its owner, even an owner killed by SIGKILL (real processes, no vLLM)."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from servematrix.serve import process


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def spawned(tmp_path, script: str) -> process.Child:
    log = open(tmp_path / "child.log", "ab", buffering=0)
    return process.spawn([sys.executable, "-c", textwrap.dedent(script)], {}, log)


@pytest.mark.parametrize("script, code", [("import sys; sys.exit(3)", 3),
                                          ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9),
                                          ("print('ok')", 0)])
def test_the_spawned_process_exits_with_the_childs_code_or_signal(tmp_path, script, code):
    proc = spawned(tmp_path, script)
    assert proc.wait(timeout=10) == code
    proc.pump.close()


def test_what_the_child_prints_reaches_the_log_through_the_reaper(tmp_path):
    proc = spawned(tmp_path, "print('hello from the child', flush=True)")
    proc.wait(timeout=10)
    proc.pump.close()
    assert "hello from the child" in (tmp_path / "child.log").read_text()


def test_a_missing_executable_is_refused_at_spawn_as_popen_would(tmp_path):
    with open(tmp_path / "x.log", "ab") as log, pytest.raises(FileNotFoundError):
        process.spawn(["/nonexistent/vllm-serve"], {}, log)


GRANDCHILDREN = """
    import json, os, subprocess, sys, time
    kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    print(json.dumps([os.getpid(), kept.pid, left.pid]), flush=True)
    time.sleep(float(sys.argv[1]))
"""


def test_when_the_child_exits_its_orphans_are_killed_even_those_that_left_the_group(tmp_path):
    log = open(tmp_path / "child.log", "ab", buffering=0)
    proc = process.spawn([sys.executable, "-c", textwrap.dedent(GRANDCHILDREN), "1"], {}, log)
    assert proc.wait(timeout=15) == 0
    proc.pump.close()
    pids = json.loads((tmp_path / "child.log").read_text().splitlines()[0])
    assert wait_gone(pids, 3) == []


OWNER = """
    import json, sys, textwrap, time
    from servematrix.serve import process
    proc = process.spawn([sys.executable, "-c", textwrap.dedent(sys.argv[1]), "300"], {},
                         open(sys.argv[2], "ab", buffering=0))
    print(proc.pid, flush=True)
    time.sleep(300)
"""


def test_an_owner_killed_by_sigkill_leaves_no_process_of_the_tree_behind(tmp_path):
    log = tmp_path / "child.log"
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(OWNER), GRANDCHILDREN, str(log)],
                             stdout=subprocess.PIPE, text=True)
    reaper = int(owner.stdout.readline())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not log.read_text().strip():
        time.sleep(0.05)
    tree = [reaper, *json.loads(log.read_text().splitlines()[0])]
    assert all(alive(p) for p in tree)
    owner.send_signal(signal.SIGKILL)  # no cleanup of servematrix runs: only the reaper can act
    owner.wait(timeout=5)
    started = time.monotonic()
    assert wait_gone(tree, 5) == [], f"left behind {[p for p in tree if alive(p)]}"
    assert time.monotonic() - started < 2  # the reaper polls its owner every 0.2 s


def test_stop_still_ends_a_child_that_ignores_sigterm_within_the_grace(tmp_path):
    proc = spawned(tmp_path, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(300)")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "ready" not in (tmp_path / "child.log").read_text():
        time.sleep(0.05)
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    assert len(tree) == 2
    started = time.monotonic()
    process.stop(proc, grace=0.5)
    assert time.monotonic() - started < 3
    assert wait_gone(tree, 1) == []


def test_a_killed_tree_the_kernel_is_slow_to_reap_ends_the_stop_not_the_run(tmp_path, monkeypatch):
    """On a host loaded to 30+, a SIGKILLed reaper outlived the 5 s wait and the TimeoutExpired ended a
    whole sweep as an internal error. The wait is bounded and its expiry is no error: the tree was
    SIGKILLed and dies when the kernel lets it."""
    proc = spawned(tmp_path, "import time; print('ready', flush=True); time.sleep(300)")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "ready" not in (tmp_path / "child.log").read_text():
        time.sleep(0.05)
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    real_wait, waits = proc.wait, []

    def slow_to_reap(timeout=None):
        waits.append(timeout)
        raise subprocess.TimeoutExpired(proc.args, timeout)

    monkeypatch.setattr(proc, "wait", slow_to_reap)
    monkeypatch.setattr(proc, "poll", lambda: None)  # not reaped yet, as the loaded host had it
    process.stop(proc, grace=0.1)  # must return, not raise
    assert waits and all(t is not None for t in waits)  # every wait was bounded
    assert real_wait(timeout=10) is not None and wait_gone(tree, 5) == []  # and the tree was killed
