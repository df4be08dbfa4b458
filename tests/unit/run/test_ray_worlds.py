"""`--backend ray`'s orchestration with Ray scripted (an actor handle whose calls run the real actor
body in this process) and the persistent World scripted: one actor per release fed check after
check, a worker that cannot start is WorkerDied at the driver as it is locally, a lost actor is that
check's failure and the next check starts a new one, and the sweep's pool (serve/world.py's Worlds,
the pipeline's) holds Ray actors only for the Ray backend."""

from pathlib import Path

import pytest

from servematrix.run import ray_tasks as ray_worlds
from servematrix.sweep import cells, runner
from servematrix.serve.world import WorkerDied


class ScriptedWorld:
    """World's interface: exit codes scripted per log name; `refuse` makes its start fail."""

    made: list = []

    def __init__(self, python, env, directory):
        self.directory, self.checks, self.closed = directory, [], False
        ScriptedWorld.made.append(self)

    def check(self, argv, env, log, timeout):
        if log.name == "refuse.log":
            raise WorkerDied("the persistent worker did not start: ImportError: vllm")
        self.checks.append(log.name)
        return 0 if log.name != "fail.log" else 1

    def close(self):
        self.closed = True


class Handle:
    """What ray.remote(WorldActor).remote gives: methods with .remote(); a lost actor raises on get."""

    def __init__(self, body, lost):
        self.body, self.lost = body, lost
        for name in ("check", "where", "close"):
            setattr(self, name, type("M", (), {"remote": staticmethod(self._call(name))}))

    def _call(self, name):
        def call(*args):
            def resolve():  # what ray.get does with the call's object ref
                if self.lost():
                    raise RuntimeError("RayActorError: the actor died unexpectedly")
                return getattr(self.body, name)(*args)
            return resolve
        return call


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setattr(ray_worlds, "World", ScriptedWorld)
    ScriptedWorld.made = []
    state = {"lost": False, "actors": []}

    def remote(python, env, directory):
        state["actors"].append(directory)
        return Handle(ray_worlds.WorldActor(python, env, directory), lambda: state["lost"])

    return state, lambda **kw: ray_worlds.RayWorld("/py", {"A": "1"}, Path("/run/.workers/current"),
                                                   remote=remote, get=lambda f: f())


def test_one_actor_serves_check_after_check_and_returns_the_worlds_codes(cluster):
    state, make = cluster
    world = make()
    assert [world.check(["--model", "/t"], {}, Path(f"/r/{n}.log"), 60) for n in ("a", "fail", "b")] == [0, 1, 0]
    assert state["actors"] == ["/run/.workers/current/actor-1"] and world.starts == 1 and world.node
    (w,) = ScriptedWorld.made
    assert w.checks == ["a.log", "fail.log", "b.log"]
    world.close()
    assert w.closed and world.actor is None


def test_a_worker_that_cannot_start_is_worker_died_at_the_driver_as_it_is_locally(cluster):
    _, make = cluster
    with pytest.raises(WorkerDied, match="did not start: ImportError"):
        make().check([], {}, Path("/r/refuse.log"), 60)


def test_a_lost_actor_is_that_checks_failure_and_the_next_check_starts_a_new_actor(cluster):
    state, make = cluster
    world = make()
    assert world.check([], {}, Path("/r/a.log"), 60) == 0
    state["lost"] = True
    assert world.check([], {}, Path("/r/b.log"), 60) is None and world.actor is None
    state["lost"] = False
    assert world.check([], {}, Path("/r/c.log"), 60) == 0
    assert world.starts == 2 and state["actors"][-1].endswith("actor-2")


def test_the_sweeps_pool_makes_ray_worlds_only_for_the_ray_backend(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(ray_worlds, "RayWorld", lambda python, env, d, address: made.append((d, address)) or "ray")
    opts = runner.SweepOptions(releases=["current"], layouts=cells.layouts("tp1"), quants=["none"], out=tmp_path,
                               backend="ray", ray_address="10.0.0.1:6379")
    pool = runner._worlds(opts)
    assert pool.make("/py", {}, tmp_path / "w") == "ray" and made == [(tmp_path / "w", "10.0.0.1:6379")]
    assert pool.directory == tmp_path / ".workers"
    local = runner._worlds(opts.model_copy(update={"backend": "local"})).make("/py", {}, tmp_path / "w")
    assert type(local).__name__ == "World" and local.proc is None  # nothing started until its first check


def test_a_finished_releases_world_is_closed_before_the_next_releases_checks(tmp_path):
    from servematrix.serve.world import Worlds

    pool = Worlds(tmp_path, make=lambda python, env, d: ScriptedWorld(python, env, d))
    ScriptedWorld.made = []
    for release in ("cpu-0.20.2", "current"):
        pool._worlds[release] = (pool.make("/py", {}, tmp_path / release), None)
    pool.close_others("current")
    assert [w.closed for w in ScriptedWorld.made] == [True, False] and list(pool._worlds) == ["current"]
    pool.close()
    assert ScriptedWorld.made[1].closed and not pool._worlds


def test_isolated_and_ray_together_or_an_address_without_ray_is_one_argument_error(tmp_path, capsys):
    from servematrix.cli import main

    assert main(["sweep", "--backend", "ray", "--isolated", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", "--ray-address", "h:1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: --isolated") and err[1].startswith("error: --ray-address")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
