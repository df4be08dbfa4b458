"""`--backend ray`: each job runs as a Ray task wherever its resources are free, and sends its
record and its files (server log, fix reports, lm-eval samples) back into the driver's reports.

A node offers its GPUs (`num_gpus`) and one `servematrix_cpu_server` slot (a CPU-mode server takes
the node's cores). Start worker nodes with `ray start --address HEAD --resources
'{"servematrix_cpu_server": 1}'`; without --ray-address the driver starts a one-node cluster here.
Every node needs servematrix and the vLLM build installed at the same paths as the driver.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from servematrix.run.dispatch import CPU_SERVER


def connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # a local one-node cluster: the host's cores and GPUs, and one CPU-server slot
        ray.init(resources={CPU_SERVER: 1}, include_dashboard=False, log_to_driver=True)


def run_job(matrix, options_json: str, entry_id: str, k: int, total: int):
    """Ray task body: run one entry into a scratch directory on this node and return
    (record JSON with the scratch paths, the scratch path, tar.gz bytes of the entry's directory)."""
    import ray

    from servematrix.run.session import RunOptions, Runner

    scratch = Path(tempfile.mkdtemp(prefix="servematrix-ray-"))
    try:
        options = RunOptions.model_validate_json(options_json).model_copy(update={"out_dir": scratch})
        entry = next(e for e in matrix.entries if e.id == entry_id)
        runner = Runner(matrix, [entry], options)
        runner.progress.total = total
        runner.probe_current()
        rec = runner.execute(k, entry, [int(i) for i in ray.get_gpu_ids()])
        runner.progress.close()
        return rec.model_dump_json(), str(scratch), _pack(scratch, entry.id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def unpack(result: tuple, out_dir: Path):
    """The driver's side: the entry's files under out_dir, the record's paths pointing at them."""
    from servematrix.record import ScenarioRecord

    record_json, scratch, blob = result
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(out_dir, filter="data")
    # the record names files by their scratch path on the node; point it at the copies here
    old, new = json.dumps(scratch)[1:-1], json.dumps(str(out_dir))[1:-1]
    return ScenarioRecord.model_validate_json(record_json.replace(old, new))


def _pack(root: Path, entry_id: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if (root / entry_id).exists():
            tar.add(root / entry_id, arcname=entry_id)
    return buf.getvalue()
