"""The sweep's persistent worlds on a Ray cluster (`sweep --backend ray`): one actor per
`servematrix_cpu_server` slot the cluster offers, each holding a release's persistent world
(serve/world.py's Worlds, on its node) and fed one cell's load check at a time by
sweep/spread.py.

Nothing is shared by path between the driver and a node:
- a twin goes through Ray's object store: the driver tars each twin directory once (the first time
  a cell needs it) and ray.put's it; an actor unpacks it once into its scratch directory, keyed by
  the blob's digest. The driver builds the twins (it has the forge cache they are mirrored from;
  a node may have none) and each node receives only the ones its cells use.
- a cell's load check runs into a scratch directory on the node (its paths and the twin's swapped
  for the node's); its files (server.log, loadcheck/ rank results) come back as tar.gz bytes with
  the result, unpacked under the cell's directory on the driver the moment the check ends, and the
  result's paths swapped back to the driver's.

An actor lost mid-check (killed, its node gone) is `ActorLost` for spread.py to retry elsewhere;
a check that crashes or hangs the world inside a live actor is handled there as World handles it
(that cell's failure, the world restarted by the next check). Every actor is owned by the driver:
close() (and the driver's own death) ends them, and a world's process tree dies with its actor
(serve/process.py's reaper), so nothing outlives the sweep on any node.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

from servematrix.errors import ArgumentError
from servematrix.record import StageFailed
from servematrix.run.dispatch import CPU_SERVER
from servematrix.serve.world import ActorLost

PLACE_TIMEOUT = 120.0  # s for a new actor to be placed and answer (a fresh Ray worker imports servematrix)
CLOSE_GRACE = 10.0  # s for the actors to stop their worlds and remove their scratch before ray.kill
# A Ray worker that exits SIGKILLs its direct children: here that is serve/process.py's reaper,
# which alone can end the world's tree (the world runs in the reaper's own session), so a world
# whose node or actor was lost would be orphaned. Left alone, the reaper sees its owner gone and
# kills the whole tree itself.
LEAVE_CHILDREN = {"RAY_kill_child_processes_on_worker_exit": "0"}


def pack(root: Path) -> bytes:
    """`root`'s contents as tar.gz bytes; links are followed (a twin may link into the forge cache,
    which the node does not have)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", dereference=True) as tar:
        if root.exists():
            tar.add(root, arcname=".")
    return buf.getvalue()


def unpack(blob: bytes, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(into, filter="data")


def swap(model, swaps: list[tuple[str, str]]):
    """A pydantic model with every path prefix `old` replaced by `new` (in its JSON form: paths
    hide in argv, logs' signatures, results)."""
    text = model.model_dump_json()
    for old, new in swaps:
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return type(model).model_validate_json(text)


def twin_path(argv: list[str]) -> str:
    return argv[argv.index("--model") + 1]


class CellWorld:
    """The actor's body (ray.remote in RayFleet): a release's persistent world on this node, the
    twins it was sent, and a scratch directory for the check in flight."""

    def __init__(self, node: str | None = None, get=None):
        import platform

        from servematrix.serve import world

        self.scratch = Path(tempfile.mkdtemp(prefix="servematrix-world-"))
        self.worlds = world.Worlds(self.scratch / "workers")
        self.twins: dict[str, Path] = {}
        self.n = 0
        self._get = get
        if node is None or get is None:
            import ray

            self._get = get or ray.get
            # the host name alone does not tell two nodes of one machine apart (a test cluster)
            node = node or f"{platform.node()}/{ray.get_runtime_context().get_node_id()[:12]}"
        self.node = node

    def where(self) -> str:
        return self.node

    def _twin(self, digest: str, refs: list) -> Path:
        if digest not in self.twins:
            dest = self.scratch / "twins" / digest
            unpack(self._get(refs[0]), dest)
            self.twins[digest] = dest
        return self.twins[digest]

    def check(self, release: str, spec, check, env: dict[str, str], twin: tuple[str, str, list]) -> tuple:
        """The check as the driver would run it, with the cell's directory and the twin at their
        places on this node: (("ok", result) or ("failed", failure, recorded), tar.gz of the cell's
        files), every path in the result the driver's again."""
        driver_twin, digest, refs = twin
        cell_dir = str(spec.log_path.parent)
        self.n += 1
        local = self.scratch / "cells" / str(self.n)
        there = [(cell_dir, str(local)), (driver_twin, str(self._twin(digest, refs)))]
        back = [(new, old) for old, new in there]
        node_env = {k: v.replace(driver_twin, there[1][1]) for k, v in env.items()}
        self.worlds.close_others(release)  # one world per actor: a release change frees the last one
        try:
            out = ("ok", swap(self.worlds.check(release, swap(spec, there), swap(check, there), node_env), back))
        except StageFailed as exc:
            out = ("failed", swap(exc.failure, back), {k: swap(v, back) if hasattr(v, "model_dump_json") else v
                                                  for k, v in exc.recorded.items()})
        try:
            return out, pack(local)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def close(self) -> None:
        self.worlds.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class Twins:
    """The driver's twins in the object store: each directory tarred and put once (the first cell
    that needs it), named by its blob's digest."""

    def __init__(self, put=None):
        self._put = put
        self._refs: dict[str, tuple[str, str, list]] = {}
        self._lock = threading.Lock()

    def ref(self, path: str) -> tuple[str, str, list]:
        with self._lock:  # several cells of one twin may start at once: one put
            if path not in self._refs:
                blob = pack(Path(path))
                put = self._put
                if put is None:
                    import ray

                    put = ray.put
                # in a list: an ObjectRef passed bare would be resolved (copied) on every call
                self._refs[path] = (path, hashlib.sha256(blob).hexdigest()[:16], [put(blob)])
            return self._refs[path]


class RemoteWorld:
    """Worlds' interface (check(release, spec, check, env)) over one actor: the cell's files land
    under the driver's cell directory, the result or StageFailed as a local check gives them."""

    def __init__(self, actor, node: str, twins: Twins, get):
        self.actor, self.node, self.twins, self._get = actor, node, twins, get

    def check(self, release: str, spec, check, env: dict[str, str]):
        twin = self.twins.ref(twin_path(spec.argv))
        try:
            out, blob = self._get(self.actor.check.remote(release, spec, check, env, twin))
        except Exception as exc:  # noqa: BLE001 - sorted below: the actor's loss, or a bug to raise
            if _task_error(exc):
                raise
            raise ActorLost(f"the world on {self.node} was lost ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        unpack(blob, spec.log_path.parent)
        if out[0] == "ok":
            return out[1]
        raise StageFailed(out[1], **out[2])


def _task_error(exc: Exception) -> bool:
    """An exception the actor's method raised (a bug: it must surface), not the actor's loss."""
    try:
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:
        return False
    return isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError)


class RayFleet:
    """The sweep's worlds on the cluster: `start()` makes one actor per CPU-server slot, `replace`
    one in place of a lost actor while a slot is free, `close()` ends them all (and the one-node
    cluster it started itself). `remote`, `get`, `kill` and `slots` are Ray's unless scripted."""

    def __init__(self, address: str | None, remote=None, get=None, kill=None, slots=None, put=None):
        self.worlds: list[RemoteWorld] = []
        self.twins = Twins(put)
        self._own_cluster = False
        if remote is None:
            import ray

            from servematrix.run import signals
            from servematrix.run.ray_tasks import connect

            self._own_cluster = address is None and not ray.is_initialized()
            connect(address)
            signals.reinstall()  # ray.init installed its own handlers: Ctrl-C must reach the sweep
            remote = ray.remote(num_cpus=0, resources={CPU_SERVER: 1}, max_restarts=0,
                                runtime_env={"env_vars": LEAVE_CHILDREN})(CellWorld).remote
            get, kill = ray.get, ray.kill
            slots = slots or (lambda total: int((ray.cluster_resources() if total else ray.available_resources())
                                                .get(CPU_SERVER, 0)))
        self._remote, self._get, self._kill, self._slots = remote, get, kill, slots

    def start(self) -> list[RemoteWorld]:
        n = self._slots(True)
        if n < 1:
            raise ArgumentError("--ray-address", f"the cluster offers no {CPU_SERVER} slot: start its nodes with "
                                                 f"ray start ... --resources '{{\"{CPU_SERVER}\": 1}}'")
        actors = [self._remote() for _ in range(n)]
        nodes = self._get([a.where.remote() for a in actors], timeout=PLACE_TIMEOUT)
        self.worlds = [RemoteWorld(a, node, self.twins, self._get) for a, node in zip(actors, nodes)]
        return list(self.worlds)

    def replace(self, lost: RemoteWorld) -> RemoteWorld | None:
        """A new world for a lost one while the cluster still has a free slot (its node may be gone
        with it: then None, and the other worlds carry on). Called on a thread of its own
        (spread.py): placing an actor may wait up to PLACE_TIMEOUT."""
        self._end(lost)
        if self._slots(False) < 1:
            return None
        world = RemoteWorld(self._remote(), "?", self.twins, self._get)
        self.worlds.append(world)  # close() ends it even while it waits to be placed
        try:
            world.node = self._get(world.actor.where.remote(), timeout=PLACE_TIMEOUT)
        except Exception:  # noqa: BLE001 - not placed in time (the slot went with its node): none
            self._end(world)
            return None
        return world

    def _end(self, world: RemoteWorld) -> None:
        if world in self.worlds:
            self.worlds.remove(world)
        try:
            self._kill(world.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        """Every world stopped (gracefully for CLOSE_GRACE, then killed), on every path."""
        worlds, self.worlds = self.worlds, []
        try:
            self._get([w.actor.close.remote() for w in worlds], timeout=CLOSE_GRACE)
        except Exception:  # noqa: BLE001 - a lost or stuck actor: killed below all the same
            pass
        for w in worlds:
            try:
                self._kill(w.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._own_cluster:
            import ray

            ray.shutdown()
