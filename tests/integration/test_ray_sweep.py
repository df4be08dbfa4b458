"""`servematrix sweep --backend ray` on a real local multi-node Ray cluster (ray.cluster_utils: a
head and a worker node, each with one servematrix_cpu_server slot, num_cpus=1 and a TMPDIR of its
own; both share this host's cores) with real vLLM load checks: the cells land on both nodes and
come home as data into the driver's run directory, their verdicts equal a local sweep's of the same
cells, and the worker node removed while its second cell is in flight loses none of its finished
cells; the cell it was running is retried on the head and passes; no world's process outlives the
sweep; Ctrl-C on the driver records its cell in flight as interrupted and leaves no actor or
world process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from servematrix.run.dispatch import CPU_SERVER

from .conftest import REPO, servematrix

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

CELLS = "llama/tp1-none,qwen3/tp1-none,gpt2/tp1-none,opt/tp1-none,qwen2/tp1-none,qwen3_moe/tp1-none"
SWEEP_TIMEOUT = 400  # s: two worlds importing vLLM at once on a 2-core host, then six load checks


def records(out: Path) -> dict:
    return {r["id"]: r for r in json.loads((out / "summary.json").read_text())["scenarios"]}


def in_flight(tmp: Path, n: int) -> bool:
    """A world on the node whose temp directory is `tmp` is running its n-th check (its scratch
    copy of that cell exists only while the check runs: run/ray_worlds.py)."""
    return any(tmp.glob(f"servematrix-world-*/cells/{n}/loadcheck"))


def node_processes(tmps: list[Path]) -> list[str]:
    """Processes (worlds, ranks) started from a node's scratch directory."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(str(t) in cmd for t in tmps):
            found.append(cmd[:200])
    return found


def sweep(address: str, out: Path, cache: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "servematrix.cli", "sweep", "--backend", "ray", "--ray-address",
                             address, "--layouts", "tp1", "-k", CELLS, "--out", str(out), "--timeout", "150"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SERVEMATRIX_CACHE": cache})


def finish(proc: subprocess.Popen, t0: float) -> str:
    try:
        return proc.communicate(timeout=max(1, SWEEP_TIMEOUT - (time.monotonic() - t0)))[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    base = tmp_path_factory.mktemp("ray-sweep")
    head_tmp, worker_tmp = base / "head-tmp", base / "worker-tmp"
    head_tmp.mkdir()
    worker_tmp.mkdir()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {CPU_SERVER: 1}, "include_dashboard": False, "env_vars": {"TMPDIR": str(head_tmp)}})
    try:
        worker = c.add_node(num_cpus=1, resources={CPU_SERVER: 1}, env_vars={"TMPDIR": str(worker_tmp)})
        yield c, worker, base, head_tmp, worker_tmp
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def spread_sweep(cluster, shared_cache):
    c, worker, base, head_tmp, worker_tmp = cluster
    out = base / "run"
    t0 = time.monotonic()
    proc = sweep(c.address, out, shared_cache)
    removed_after: dict[str, dict] = {}  # the records published before the worker went
    while proc.poll() is None and time.monotonic() - t0 < SWEEP_TIMEOUT:
        if in_flight(worker_tmp, 2):  # its first cell finished, the second one running
            removed_after = {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
                             for p in out.glob("*/*/record.json")}
            c.remove_node(worker, allow_graceful=False)
            break
        time.sleep(0.02)
    stdout = finish(proc, t0)
    seconds = time.monotonic() - t0
    left = node_processes([head_tmp, worker_tmp])
    return proc.returncode, stdout, out, worker.node_id[:12], c.head_node.node_id[:12], removed_after, left, seconds


def test_the_cells_ran_on_both_nodes_and_came_home_as_data(spread_sweep):
    code, stdout, out, worker, head, _, _, seconds = spread_sweep
    assert code == 0, stdout[-4000:]
    by_id = records(out)
    assert set(by_id) == set(CELLS.split(","))
    nodes = {r["node"].rsplit("/", 1)[-1] for r in by_id.values()}
    assert nodes == {worker, head}, (nodes, stdout[-3000:])
    for cid, r in by_id.items():  # each cell's files under its directory here, its record pointing at them
        assert json.loads((out / cid / "loadcheck" / "rank0.json").read_text())["ok"], cid
        assert (out / cid / "server.log").read_text().startswith("$ "), cid
        assert f"--loadcheck-out={out / cid / 'loadcheck'}" in r["server_command"]
    print(f"Ray sweep of {len(by_id)} cells over 2 nodes: {seconds:.0f} s")


def test_the_worker_removed_mid_cell_loses_no_finished_cell_and_its_cell_is_retried_on_the_head(spread_sweep):
    code, stdout, out, worker, head, removed_after, left, _ = spread_sweep
    assert removed_after, f"the worker never ran a second cell: {stdout[-3000:]}"
    by_id = records(out)
    assert any(r["node"].endswith(worker) for r in removed_after.values()), removed_after
    for cid, before in removed_after.items():  # every cell finished before the node went is kept as it was
        assert by_id[cid] == before and before["verdict"] == "pass", cid
    retried = [r for r in by_id.values() if r["attempts"] == 2]
    assert len(retried) == 1, stdout[-3000:]
    (r,) = retried
    assert r["verdict"] == "pass" and r["node"].endswith(head) and "retried on another world" in r["note"]
    assert f"{r['id']}: the world on " in stdout and "retrying on another world" in stdout
    assert left == [], left  # the lost node's world and ranks died with it; the head's with the sweep


def test_the_verdicts_equal_a_local_sweeps_of_the_same_cells(spread_sweep, tmp_path, shared_cache):
    _, _, out, _, _, _, _, _ = spread_sweep
    proc = servematrix("sweep", "--layouts", "tp1", "-k", CELLS, "--out", str(tmp_path / "local"), "--timeout", "150",
                       timeout=600, env={"SERVEMATRIX_CACHE": shared_cache})
    assert proc.returncode == 0, proc.stderr[-3000:]
    local, spread = records(tmp_path / "local"), records(out)
    assert {i: r["verdict"] for i, r in spread.items()} == {i: r["verdict"] for i, r in local.items()}
    for i, r in local.items():  # the same parameters loaded, wherever the world ran
        assert r["load_check"]["digests"] and spread[i]["load_check"]["digests"] == r["load_check"]["digests"], i


def test_ctrl_c_on_the_driver_records_the_cell_in_flight_as_interrupted_and_leaves_no_process(cluster, spread_sweep,
                                                                                              tmp_path, shared_cache):
    c, _, _, head_tmp, _ = cluster  # the head alone now: the worker was removed by the sweep above
    before = set(head_tmp.glob("servematrix-world-*"))
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = sweep(c.address, out, shared_cache)
    while proc.poll() is None and time.monotonic() - t0 < SWEEP_TIMEOUT:
        if any(d not in before and (d / "cells" / "1" / "loadcheck").exists() for d in head_tmp.glob("servematrix-world-*")):
            break  # the new world's first check is running (its vLLM import, seconds on this host)
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout = finish(proc, t0)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 2 and summary["status"] == "interrupted", stdout[-3000:]
    (cut,) = [r for r in summary["scenarios"] if r["failure"]]
    assert cut["failure"]["kind"] == "interrupted" and cut["node"].endswith(c.head_node.node_id[:12])
    deadline = time.monotonic() + 20
    while (node_processes([head_tmp]) or actor_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node_processes([head_tmp]) == [] and actor_processes() == []


def actor_processes() -> list[str]:
    """Ray workers still holding a world actor (their title is ray::CellWorld...)."""
    return [" ".join(p.info["cmdline"] or [])[:120] for p in psutil.process_iter(["cmdline"])
            if "CellWorld" in " ".join(p.info["cmdline"] or [])]
