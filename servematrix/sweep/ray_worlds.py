"""`servematrix sweep --backend ray`: the persistent worlds (worker.py's World: vLLM imported once,
each check's ranks forked fresh) as Ray actors, one per release, placed where the cluster has a
`servematrix_cpu_server` slot (run's own resource: one CPU-mode vLLM per node at a time). The
runner's cells, twins and records are unchanged: `RayWorld` has World's interface, so
worker.run_check feeds it exactly as it feeds a local World, and the ranks write their logs and
results into the run directory by its path (a one-node cluster, or nodes sharing that filesystem).

A check that crashes or hangs the worker is handled inside the actor as World handles it (kill,
restart next time); an actor that is itself lost (its node gone, killed) is that cell's failure,
and the next cell starts a new actor.
"""

from __future__ import annotations

from pathlib import Path

from servematrix.serve.world import World, WorkerDied


class WorldActor:
    """The actor's body (wrapped by ray.remote in `_remote`): a World on its node."""

    def __init__(self, python: str, env: dict[str, str], directory: str):
        import platform

        self.world, self.node = World(python, env, Path(directory)), platform.node()

    def check(self, argv: list[str], env: dict[str, str], log: str, timeout: float) -> tuple[int | None, str | None]:
        try:
            return self.world.check(argv, env, Path(log), timeout), None
        except WorkerDied as exc:  # sent back as data: the driver raises it as World would
            return None, str(exc)

    def where(self) -> str:
        return self.node

    def close(self) -> None:
        self.world.close()


def _remote(address: str | None):
    import ray

    from servematrix.run.dispatch import CPU_SERVER
    from servematrix.run.ray_tasks import connect

    connect(address)  # joins `address`, or starts a one-node cluster here with one CPU-server slot
    return ray.remote(num_cpus=0, resources={CPU_SERVER: 1}, max_restarts=0)(WorldActor).remote, ray.get


class RayWorld:
    """World's interface over a Ray actor. `remote(python, env, dir)` makes an actor handle and
    `get` resolves its calls (ray.remote / ray.get by default; scripted in the unit tests)."""

    def __init__(self, python: str, env: dict[str, str], directory: Path, address: str | None = None,
                 remote=None, get=None):
        self.python, self.env, self.root = python, env, Path(directory)
        self._make, self._get = (remote, get) if remote is not None else _remote(address)
        self.actor = None
        self.starts = 0
        self.node: str | None = None

    def check(self, argv: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
        if self.actor is None:
            self.starts += 1
            self.actor = self._make(self.python, self.env, str(self.root / f"actor-{self.starts}"))
            self.node = self._get(self.actor.where.remote())
        try:
            code, died = self._get(self.actor.check.remote(argv, env, str(log), timeout))
        except Exception:  # noqa: BLE001 - ray.exceptions.RayActorError & co: the actor is gone, not the sweep
            self.actor = None
            return None
        if died is not None:
            raise WorkerDied(died)
        return code

    def close(self) -> None:
        if self.actor is not None:
            try:
                self._get(self.actor.close.remote())
            except Exception:  # noqa: BLE001 - closing a lost actor: nothing left to stop
                pass
            self.actor = None
