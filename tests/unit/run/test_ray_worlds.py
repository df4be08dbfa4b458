"""The sweep's Ray worlds (run/ray_worlds.py) with Ray scripted: an actor handle whose calls run the
real actor body in this process, over a scripted persistent world; the driver's and the node's
directories are apart, as on a cluster without a shared filesystem. A cell's files come home as
data under its directory with the driver's paths, the twin reaches the node through the object
store once, a lost actor is ActorLost (a bug in the actor is raised), the fleet has one actor per
slot and ends them all; the sweep's pool is a fleet only for the Ray backend."""

import json
from pathlib import Path

import pytest

from servematrix.record import Failure, LoadCheckResult, LoadResult, StageFailed
from servematrix.run import ray_worlds
from servematrix.serve import loadcheck, world
from servematrix.serve.server import LaunchSpec
from servematrix.sweep import cells, runner
from servematrix.serve.world import ActorLost


class NodeWorlds:
    """Worlds' interface on the "node": writes a check's files where the spec says, as the ranks
    would, and fails the check whose twin lacks config.json."""

    seen: list = []

    def __init__(self, directory):
        self.closed = False

    def check(self, release, spec, check, env):
        twin = Path(spec.argv[spec.argv.index("--model") + 1])
        NodeWorlds.seen.append((spec, check, twin))
        check.out.mkdir(parents=True, exist_ok=True)
        spec.log_path.write_text(f"loading {twin}/model.safetensors\n")
        ok = (twin / "config.json").exists()
        (check.out / "rank0.json").write_text(json.dumps({"rank": 0, "ok": ok}))
        if not ok:
            fail = Failure.of("exception", f"FileNotFoundError: {twin}/config.json", "load")
            raise StageFailed(fail, load=LoadResult(ok=False, error=fail))
        return LoadCheckResult(ok=True, ranks=[], seconds=1.0)

    def close_others(self, keep):
        pass

    def close(self):
        self.closed = True


class Handle:
    """What ray.remote(CellWorld).remote() gives: methods with .remote(); a lost actor raises on get."""

    def __init__(self, body, state):
        self.body, self.state = body, state
        for name in ("check", "where", "close"):
            setattr(self, name, type("M", (), {"remote": staticmethod(self._call(name))}))

    def _call(self, name):
        def call(*args):
            def resolve():  # what ray.get does with the call's object ref
                if self.state["lost"]:
                    raise RuntimeError("ActorDiedError: the actor died unexpectedly")
                return getattr(self.body, name)(*args)
            return resolve
        return call


def get(ref, timeout=None):
    if isinstance(ref, list):
        return [get(r) for r in ref]
    return ref() if callable(ref) else ref


@pytest.fixture
def node(monkeypatch, tmp_path):
    monkeypatch.setattr(world, "Worlds", NodeWorlds)
    monkeypatch.setattr(ray_worlds.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "node" / f"scratch{len(made)}"))
    NodeWorlds.seen = []
    state = {"lost": False, "puts": 0, "gets": 0}
    made = []

    def put(blob):
        state["puts"] += 1
        return blob

    def node_get(ref):
        state["gets"] += 1
        return ref

    def remote():
        made.append(Handle(ray_worlds.CellWorld(node=f"host/node{len(made)}", get=node_get), state))
        return made[-1]

    fleet = ray_worlds.RayFleet(None, remote=remote, get=get, kill=lambda a: state.setdefault("killed", []).append(a),
                                slots=lambda total: state.get("slots", 2), put=put)
    return state, fleet, made


def twin(tmp_path, name="llama", config=True):
    path = tmp_path / "driver" / "twins" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    if config:
        (path / "config.json").write_text("{}")
    return path


def cell(tmp_path, twin_path, cid="llama/tp1-none"):
    cell_dir = tmp_path / "driver" / "run" / cid
    spec = LaunchSpec(argv=["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", str(twin_path)],
                      port=0, log_path=cell_dir / "server.log", startup_timeout=60)
    return spec, loadcheck.Check(out=cell_dir / "loadcheck"), cell_dir


def test_a_cells_files_come_home_under_its_directory_and_the_check_ran_on_the_nodes_copies(node, tmp_path):
    state, fleet, _ = node
    w, _ = fleet.start()
    spec, check, cell_dir = cell(tmp_path, twin(tmp_path))
    assert w.check("current", spec, check, {}).ok
    node_spec, node_check, node_twin = NodeWorlds.seen[0]
    assert str(tmp_path / "driver") not in node_spec.model_dump_json() + node_check.model_dump_json()
    assert (node_twin / "model.safetensors").exists() and node_twin != Path(spec.argv[4])
    assert json.loads((cell_dir / "loadcheck" / "rank0.json").read_text())["ok"] is True
    assert (cell_dir / "server.log").read_text().startswith(f"loading {node_twin}")  # the node's log, as written
    assert not node_spec.log_path.parent.exists()  # the node's scratch copy of the cell is gone


def test_a_failed_check_is_stage_failed_at_the_driver_with_the_drivers_paths(node, tmp_path):
    _, fleet, _ = node
    w, _ = fleet.start()
    spec, check, cell_dir = cell(tmp_path, twin(tmp_path, config=False))
    with pytest.raises(StageFailed) as exc:
        w.check("current", spec, check, {})
    assert exc.value.failure.signature == f"FileNotFoundError: {spec.argv[4]}/config.json"
    assert exc.value.recorded["load"].ok is False and (cell_dir / "loadcheck" / "rank0.json").exists()


def test_a_twin_is_put_once_and_unpacked_once_per_node(node, tmp_path):
    state, fleet, _ = node
    a, b = fleet.start()
    t = twin(tmp_path)
    for i, w in enumerate((a, a, b)):
        spec, check, _ = cell(tmp_path, t, f"c{i}/tp1-none")
        w.check("current", spec, check, {})
    assert state["puts"] == 1 and state["gets"] == 2  # one put; one fetch on each of the two nodes


def test_a_lost_actor_is_actor_lost_naming_its_node(node, tmp_path):
    state, fleet, _ = node
    w, _ = fleet.start()
    state["lost"] = True
    spec, check, _ = cell(tmp_path, twin(tmp_path))
    with pytest.raises(ActorLost, match="host/node0 was lost"):
        w.check("current", spec, check, {})


def test_the_fleet_has_one_world_per_slot_replaces_a_lost_one_only_while_a_slot_is_free_and_ends_all(node):
    state, fleet, made = node
    a, b = fleet.start()
    assert (a.node, b.node) == ("host/node0", "host/node1")
    state["slots"] = 0  # the lost actor's node went with it
    assert fleet.replace(a) is None and state["killed"] == [a.actor] and fleet.worlds == [b]
    state["slots"] = 1
    c = fleet.replace(b)
    assert c.node == "host/node2" and fleet.worlds == [c]
    fleet.close()
    assert made[2].body.worlds.closed and state["killed"][-1] is c.actor and fleet.worlds == []


def test_a_cluster_without_a_cpu_server_slot_is_an_argument_error(node):
    from servematrix.errors import ArgumentError

    state, fleet, _ = node
    state["slots"] = 0
    with pytest.raises(ArgumentError, match="servematrix_cpu_server"):
        fleet.start()


def test_the_sweeps_pool_is_a_ray_fleet_only_for_the_ray_backend(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(ray_worlds, "RayFleet", lambda address: made.append(address) or "fleet")
    opts = runner.SweepOptions(releases=["current"], layouts=cells.layouts("tp1"), quants=["none"], out=tmp_path,
                               backend="ray", ray_address="10.0.0.1:6379")
    assert runner._worlds(opts) == "fleet" and made == ["10.0.0.1:6379"]
    local = runner._worlds(opts.model_copy(update={"backend": "local"}))
    assert type(local).__name__ == "Worlds" and local.directory == tmp_path / ".workers"


def test_a_finished_releases_world_is_closed_before_the_next_releases_checks(tmp_path):
    made = []

    class Scripted:
        def __init__(self):
            self.closed = False
            made.append(self)

        def close(self):
            self.closed = True

    pool = world.Worlds(tmp_path, make=lambda python, env, d: Scripted())
    for release in ("cpu-0.20.2", "current"):
        pool._worlds[release] = (pool.make("/py", {}, tmp_path / release), None)
    pool.close_others("current")
    assert [w.closed for w in made] == [True, False] and list(pool._worlds) == ["current"]
    pool.close()
    assert made[1].closed and not pool._worlds


def test_isolated_and_ray_together_or_an_address_without_ray_is_one_argument_error(tmp_path, capsys):
    from servematrix.cli import main

    assert main(["sweep", "--backend", "ray", "--isolated", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", "--ray-address", "h:1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: --isolated") and err[1].startswith("error: --ray-address")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
