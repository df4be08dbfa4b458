"""The sweep's scheduling over several worlds (sweep/spread.py), driven by a scripted double in
place of the Ray actors: each cell goes to a free world and no world holds two at once, the widest
layouts first; a world lost mid-cell costs only that cell, retried once on another world, and
recorded as an infrastructure failure when its second world is lost too; finished cells stay
published; every world gone records the rest; an interrupted cell starts nothing more; Ctrl-C
publishes the cells in flight as interrupted; and the runner's Ray path around it (sweep/runner.py
_spread_cells): cells that need no world are recorded before any world starts, a retried cell's
record says so."""

import threading
import time
from dataclasses import dataclass, field

import pytest

from servematrix.serve.world import ActorLost
from servematrix.sweep.spread import by_cost, spread


@dataclass(frozen=True)
class Cell:
    id: str
    tp: int = 1
    pp: int = 1
    release: str = "current"


@dataclass(eq=False)
class World:
    name: str
    lose: set = field(default_factory=set)  # cell ids this world is lost on
    busy: int = 0


class Script:
    """run/publish/lost/interrupted as the runner gives them, recording what happened."""

    def __init__(self, seconds=0.02):
        self.seconds, self.ran, self.published, self.overlap = seconds, [], [], False
        self.lock = threading.Lock()

    def run(self, cell, world, attempt):
        with self.lock:
            world.busy += 1
            self.overlap |= world.busy > 1
            self.ran.append((cell.id, world.name, attempt))
        try:
            time.sleep(self.seconds)
            if cell.id in world.lose:
                raise ActorLost(f"the world on {world.name} was lost")
            return ("record", cell.id, world.name, attempt)
        finally:
            world.busy -= 1

    def publish(self, cell, record):
        self.published.append(record)
        return record[0] != "interrupted"

    def go(self, cells, worlds, **kw):
        spread(cells, worlds, self.run, self.publish, lost=lambda c, w, why: ("lost", c.id, w and w.name, why),
               interrupted=lambda c, w: ("interrupted", c.id, w.name), **kw)


def test_each_cell_goes_to_a_free_world_and_no_world_holds_two_at_once():
    s = Script()
    worlds = [World("a"), World("b"), World("c")]
    s.go([Cell(f"m{i}/tp1-none") for i in range(9)], worlds)
    assert sorted(r[1] for r in s.published) == sorted(f"m{i}/tp1-none" for i in range(9))
    assert {w for _, w, _ in s.ran} == {"a", "b", "c"} and not s.overlap


def test_the_widest_layouts_come_first_release_by_release():
    cells = [Cell("x/tp1"), Cell("x/pp2", pp=2), Cell("old/tp2", tp=2, release="cpu-0.20.2"), Cell("x/tp2pp2", tp=2, pp=2)]
    assert [c.id for c in by_cost(cells, ["current", "cpu-0.20.2"])] == ["x/tp2pp2", "x/pp2", "x/tp1", "old/tp2"]


def test_a_lost_world_costs_only_its_cell_which_is_retried_once_on_another_world():
    s = Script()
    a, b = World("a", lose={"m0"}), World("b")  # the first cell goes to the first free world
    s.go([Cell("m0"), Cell("m1"), Cell("m2"), Cell("m3")], [a, b])
    assert ("record", "m0", "b", 2) in s.published
    assert [r for r in s.published if r[0] != "record"] == []
    assert sorted(r[1] for r in s.published) == ["m0", "m1", "m2", "m3"]
    lost_at = s.ran.index(("m0", "a", 1))
    assert all(w == "b" for _, w, _ in s.ran[lost_at + 1:])  # the lost world is given nothing more


def test_a_cell_whose_second_world_is_lost_too_is_an_infrastructure_failure_with_both_reasons():
    s = Script()
    s.go([Cell("m0"), Cell("m1")], [World("a", lose={"m0"}), World("b", lose={"m0"})])
    lost = [r for r in s.published if r[0] == "lost"]
    assert len(lost) == 1 and lost[0][1] == "m0"
    assert "a was lost" in lost[0][3] and "b was lost" in lost[0][3] and "twice" in lost[0][3]


def test_finished_cells_stay_published_and_every_world_gone_records_the_rest():
    s = Script()
    a = World("a", lose={"m1", "m2", "m3"})
    s.go([Cell("m0"), Cell("m1"), Cell("m2"), Cell("m3")], [a])
    assert s.published[0] == ("record", "m0", "a", 1)
    assert sorted(r[1] for r in s.published[1:]) == ["m1", "m2", "m3"]
    assert all(r[0] == "lost" and r[2] is None and "no world left" in r[3] for r in s.published[1:])


def test_a_replacement_world_takes_the_lost_cells_retry():
    s = Script()
    a = World("a", lose={"m0"})
    fresh = World("fresh")
    s.go([Cell("m0"), Cell("m1")], [a], replace=lambda w: fresh if w is a else None)
    assert s.published == [("record", "m0", "fresh", 2), ("record", "m1", "fresh", 1)]


def test_an_interrupted_cell_starts_nothing_more():
    s = Script()

    def publish(cell, record):
        s.published.append(record)
        return cell.id != "m0"

    spread([Cell("m0"), Cell("m1"), Cell("m2")], [World("a")], s.run, publish,
           lost=lambda c, w, why: ("lost", c.id), interrupted=lambda c, w: ("interrupted", c.id))
    assert [r[1] for r in s.published] == ["m0"]


def test_ctrl_c_publishes_the_cells_in_flight_as_interrupted_and_goes_on_up():
    s = Script(seconds=0.5)
    release = threading.Event()

    def run(cell, world, attempt):
        if cell.id == "m0":
            raise KeyboardInterrupt  # as the main thread would see it: handed over from the world's thread
        release.wait(2)
        return ("record", cell.id)

    with pytest.raises(KeyboardInterrupt):
        spread([Cell("m0"), Cell("m1")], [World("a"), World("b")], run, s.publish,
               lost=lambda c, w, why: ("lost", c.id), interrupted=lambda c, w: ("interrupted", c.id, w.name))
    release.set()
    assert s.published == [("interrupted", "m1", "b")]


def test_a_cell_without_a_result_is_recorded_as_an_infrastructure_error_naming_its_node():
    from servematrix.check.verdict import judge
    from servematrix.record import Failure
    from servematrix.sweep import cells, registry, runner

    cell = cells.Cell(arch=registry.Arch(arch="LlamaForCausalLM", kind="text", model_type="llama", forgeable=True),
                      layout=cells.layouts("tp1")[0], quant="none")
    lost = Failure(kind="signal", signature="servematrix: its world was lost twice", infra=True, phase="load")
    record = judge(runner._unrun(cell, {"vllm": "0.32.0", "torch": "2.9"}, "host/abc", lost, attempts=2))
    assert (record.id, record.verdict, record.node, record.attempts) == ("llama/tp1-none", "error", "host/abc", 2)
    assert record.failure.infra and "lost twice" in record.failure.signature


class Fleet:
    """The runner's view of run/ray_worlds.py's RayFleet: worlds that lose the cells named."""

    def __init__(self, *worlds):
        self.worlds, self.started, self.closed = list(worlds), False, False

    def close(self):
        self.closed = True

    def start(self):
        self.started = True
        return self.worlds

    def replace(self, world):
        return None


def test_the_ray_sweep_runs_in_the_run_engine_records_cells_needing_no_world_first_and_a_retried_cell_says_so(monkeypatch, tmp_path):
    import io
    from types import SimpleNamespace

    from servematrix.run.session import Session
    from servematrix.serve import envs
    from servematrix.sweep import cells, registry, report, runner, twins

    def arch(name, mt, forgeable=True):
        return registry.Arch(arch=name, kind="text", model_type=mt, forgeable=forgeable, reason=None if forgeable else "x")

    tp1 = cells.layouts("tp1")[0]
    chosen = [cells.Cell(arch=arch("LlamaForCausalLM", "llama"), layout=tp1, quant="none"),
              cells.Cell(arch=arch("Remote", None, forgeable=False), layout=tp1, quant="none"),
              cells.Cell(arch=arch("OPTForCausalLM", "opt"), layout=tp1, quant="none")]
    versions = {"vllm": "0.32.0", "torch": "2.9"}
    fleet = Fleet(SimpleNamespace(node="host/aaa", lose={"llama/tp1-none"}), SimpleNamespace(node="host/bbb", lose=set()))

    def cell_run(cell, opts, python, twin_cache, world, versions, log):
        if world is None:  # not forgeable: recorded without a world, before any world starts
            assert not fleet.started
            return runner._unrun(cell, versions, "-", None).model_copy(update={"skipped": "x"})
        if cell.id in world.lose:
            raise ActorLost(f"the world on {world.node} was lost")
        return runner._unrun(cell, versions, world.node, None)

    monkeypatch.setattr(runner, "_cell", cell_run)
    monkeypatch.setattr(runner, "_twin", lambda cell, opts, cache: twins.Twin(model_type=cell.arch.model_type, path="/t"))
    monkeypatch.setattr(runner, "_worlds", lambda opts: fleet)
    monkeypatch.setattr(envs, "versions", lambda release, python: versions)
    coverage = {"current": report.Coverage(release="current", registered=3, forgeable=2)}
    opts = runner.SweepOptions(releases=["current"], layouts=[tp1], quants=["none"], out=tmp_path / "run", backend="ray")
    work = runner.SweepWork(opts, chosen, {"current": "/py"}, coverage, "2026-12-07T00:00:00+00:00", io.StringIO())
    summary = Session(work, opts.out).run()  # the run engine `servematrix run` has, with the sweep's work
    published = summary.scenarios
    assert summary.status == "complete" and fleet.closed
    by_id = {r.id: r for r in published}
    assert published[0].id == "Remote/tp1-none" and published[0].verdict == "skipped"
    llama = by_id["llama/tp1-none"]
    assert (llama.verdict, llama.node, llama.attempts) == ("pass", "host/bbb", 2)
    assert "retried on another world: the world on host/aaa was lost" in llama.note
    assert (by_id["opt/tp1-none"].verdict, by_id["opt/tp1-none"].attempts) == ("pass", 1)
    assert coverage["current"].checked == 2 and coverage["current"].passing == 2
