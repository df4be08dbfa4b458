"""SIGTERM / Ctrl-C of the runner mid-scenario: the server's whole process tree goes, the run
exits 2, and the scenarios finished before the signal stay in the reports."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def living(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_tears_down_the_server_and_keeps_finished_reports(tmp_path, shared_cache, sig):
    out = tmp_path / "run"
    runner = subprocess.Popen(
        [sys.executable, "-m", "servematrix.cli", "run", "matrix/cpu-smoke.yaml", "--out", str(out),
         "-k", "tiny-llama/tp1-pp1-fp32,tiny-llama/tp2-pp1-fp32", "--no-gsm8k"],
        cwd=REPO, env={**os.environ, "SERVEMATRIX_CACHE": shared_cache},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    summary = out / "summary.json"

    def finished() -> int:
        try:
            return len(json.loads(summary.read_text())["scenarios"])
        except (OSError, ValueError):
            return 0

    wait_for(lambda: finished() == 1, 900, "the first scenario to finish")
    second_log = out / "tiny-llama/tp2-pp1-fp32/server.log"
    wait_for(second_log.exists, 120, "the second server to start")
    time.sleep(3)  # mid start-up: workers being spawned
    tree = [runner.pid] + [c.pid for c in psutil.Process(runner.pid).children(recursive=True)]
    assert len(tree) > 1
    runner.send_signal(sig)
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == 2, output
    time.sleep(1)
    alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left behind: {alive}"
    data = json.loads(summary.read_text())
    assert data["status"] == "interrupted" and data["exit_code"] == 2
    assert [(r["id"], r["verdict"]) for r in data["scenarios"]] == [
        ("tiny-llama/tp1-pp1-fp32", "pass"), ("tiny-llama/tp2-pp1-fp32", "error")]
    assert data["scenarios"][1]["failure"]["kind"] == "interrupted"
    assert "| tiny-llama | ✓ |" in (out / "load-success.md").read_text()
    gate = subprocess.run([sys.executable, "-m", "servematrix.cli", "gate", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert gate.returncode == 2 and "CANNOT JUDGE" in gate.stdout


def test_sigkill_of_the_runner_leaves_no_vllm_process_and_keeps_the_finished_entrys_record(tmp_path, shared_cache):
    """A SIGKILLed runner runs no cleanup: the reaper each server runs under must end the whole
    tree (api_server, EngineCore, workers) within seconds, and the entry finished before the kill
    must be on disk (its record.json and summary.json), written the moment it finished."""
    out = tmp_path / "run"
    first, second = "tiny-llama/tp1-pp1-fp32", "tiny-llama/tp2-pp1-fp32"
    runner = subprocess.Popen(
        [sys.executable, "-m", "servematrix.cli", "run", "matrix/cpu-smoke.yaml", "--out", str(out),
         "-k", f"{first},{second}", "--no-gsm8k"],
        cwd=REPO, env={**os.environ, "SERVEMATRIX_CACHE": shared_cache},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for((out / first / "record.json").exists, 900, "the first scenario's record")
        wait_for((out / second / "server.log").exists, 120, "the second server to start")

        def tree() -> list[psutil.Process]:
            try:
                return psutil.Process(runner.pid).children(recursive=True)
            except psutil.Error:
                return []

        # reaper, api_server, EngineCore and its TP workers: the processes a kill must not orphan
        # generous: on one core beside another test stream, spawning them takes longer (a wait, not a timing)
        wait_for(lambda: len(tree()) >= 5, 300, "the second server's engine processes")
        doomed = tree()
        runner.kill()  # SIGKILL
        runner.wait(timeout=10)
        killed_at = time.monotonic()
        wait_for(lambda: not [p for p in doomed if living(p)], 5, "the server's processes to die")
        print(f"server tree of {len(doomed)} processes gone {time.monotonic() - killed_at:.1f} s after SIGKILL")
    finally:
        if runner.poll() is None:
            runner.kill()
    rec = json.loads((out / first / "record.json").read_text())
    assert rec["id"] == first and rec["verdict"] == "pass" and rec["smoke"]["ok"]
    data = json.loads((out / "summary.json").read_text())
    assert data["status"] == "running"  # killed: nothing ran after the kill, what was done is there
    assert [(r["id"], r["verdict"]) for r in data["scenarios"]] == [(first, "pass")]
