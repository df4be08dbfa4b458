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
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


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
