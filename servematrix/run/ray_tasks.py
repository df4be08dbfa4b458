"""`--backend ray`: each job runs as a Ray task wherever its resources are free, and sends its
record and its files (server log, fix reports, lm-eval samples) back into the driver's reports.

A node offers its GPUs (`num_gpus`) and one `servematrix_cpu_server` slot (a CPU-mode server takes
the node's cores). Start worker nodes with `ray start --address HEAD --resources
'{"servematrix_cpu_server": 1}'`; without --ray-address the driver starts a one-node cluster here.
Every node needs servematrix and the vLLM build installed at the same paths as the driver.

Load checks (a `run` entry's, a `sweep` cell's) go through a release's persistent world
(serve/world.py); on Ray that world is an actor (`RayWorld`, World's interface) placed where the
cluster has a CPU-server slot, one per release, fed one check after another. A check that crashes
or hangs the worker is handled inside the actor as World handles it (kill, restart next time); an
actor that is itself lost (its node gone, killed) is that check's failure, and the next check
starts a new actor. The ranks write their logs and results into the run directory by its path (a
one-node cluster, or nodes sharing that filesystem).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from servematrix.record import EntryOutcome
from servematrix.run import signals
from servematrix.run.dispatch import CPU_SERVER, RayPool
from servematrix.run.options import EntryOptions, RunOptions
from servematrix.run.pipeline import Pipeline
from servematrix.run.progress import Progress
from servematrix.serve.world import World, WorkerDied


def connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # a local one-node cluster: the host's cores and GPUs, and one CPU-server slot
        ray.init(resources={CPU_SERVER: 1}, include_dashboard=False, log_to_driver=True)


def pool(matrix, options: RunOptions, total: int) -> RayPool:
    """A pool over the cluster (joined, or started here); each task gets only the entry options."""
    connect(options.ray_address)
    signals.reinstall()  # ray.init installed its own handlers: Ctrl-C / SIGTERM must reach the pool
    entry_options = options.entry.model_dump_json()
    return RayPool(run_job, lambda job: (matrix, entry_options, job.id, job.k, total))


def run_job(matrix, options_json: str, entry_id: str, k: int, total: int):
    """Ray task body: run one entry into a scratch directory on this node and return
    (outcome JSON with the scratch paths, the scratch path, tar.gz bytes of the entry's directory)."""
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="servematrix-ray-"))
    progress = Progress(total)
    try:
        options = EntryOptions.model_validate_json(options_json).model_copy(update={"out_dir": scratch})
        entry = next(e for e in matrix.entries if e.id == entry_id)
        pipeline = Pipeline(matrix, options, progress.phase)
        try:
            outcome = pipeline.execute(k, entry, [int(i) for i in ray.get_gpu_ids()])
        finally:
            pipeline.close()  # a load check's world is this task's alone
        return outcome.model_dump_json(), str(scratch), _pack(scratch, entry.id)
    finally:
        progress.close()
        shutil.rmtree(scratch, ignore_errors=True)


def unpack(result: tuple, out_dir: Path) -> EntryOutcome:
    """The driver's side: the entry's files under out_dir, the outcome's paths pointing at them."""
    outcome_json, scratch, blob = result
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(out_dir, filter="data")
    # the outcome names files by their scratch path on the node; point it at the copies here
    old, new = json.dumps(scratch)[1:-1], json.dumps(str(out_dir))[1:-1]
    return EntryOutcome.model_validate_json(outcome_json.replace(old, new))


def _pack(root: Path, entry_id: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if (root / entry_id).exists():
            tar.add(root / entry_id, arcname=entry_id)
    return buf.getvalue()


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
        except Exception:  # noqa: BLE001 - ray.exceptions.RayActorError & co: the actor is gone, not the run
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


def ray_worlds(directory: Path, address: str | None):
    """A Worlds pool whose worlds are Ray actors (the sweep's `--backend ray`)."""
    from servematrix.serve.world import Worlds

    return Worlds(directory, make=lambda python, env, d: RayWorld(python, env, d, address))
