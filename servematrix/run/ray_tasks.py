"""`--backend ray`: each job runs as a Ray task wherever its resources are free, and sends its
record and its files (server log, fix reports, lm-eval samples) back into the driver's reports.

A node offers its GPUs (`num_gpus`) and one `servematrix_cpu_server` slot (a CPU-mode server takes
the node's cores). Start worker nodes with `ray start --address HEAD --resources
'{"servematrix_cpu_server": 1}'`; without --ray-address the driver starts a one-node cluster here.
Every node needs servematrix and the vLLM build installed at the same paths as the driver.

A `run` entry's load check runs inside its task (a world of its own, closed with the task). The
sweep's load checks go to worlds that outlive a cell: run/ray_worlds.py, one actor per CPU-server
slot, results shipped home the same way (tar.gz bytes unpacked into the driver's run directory).
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


