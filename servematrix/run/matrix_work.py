"""A matrix's entries as the work of a run (run/session.py drives it): each entry a job of the pool
(this host's GPUs or CPU-server slot, or a Ray cluster's), run by the Pipeline's phases; an entry's
outcome becomes its record once compared with its baseline's record (held until that one is in,
published meanwhile with a pending record), then judged once. Every outcome is also written to its
entry's directory the moment it exists (`records`), so a SIGKILL loses nothing measured."""

from __future__ import annotations

import threading

from servematrix.check.compare import compare
from servematrix.check.verdict import judge
from servematrix.config import plan
from servematrix.config.devices import uses_gpus
from servematrix.config.matrix import Entry, Matrix
from servematrix.record import EntryOutcome, ScenarioRecord
from servematrix.report import history
from servematrix.run import dispatch, records
from servematrix.run.options import RunOptions
from servematrix.run.pipeline import Pipeline, skipped
from servematrix.run.progress import Progress
from servematrix.serve import envs, hardware


class MatrixWork:
    quiet_skips = False  # a matrix's skipped entries are few, each worth its line and its pages
    started_at = None

    def __init__(self, matrix: Matrix, entries: list[Entry], options: RunOptions, pipeline: Pipeline | None = None):
        self.matrix, self.entries, self.options = matrix, entries, options
        self.name, self.ids = matrix.spec.name, [e.id for e in entries]
        self.progress = Progress(len(entries))
        self.cancelled = threading.Event()
        self.pipeline = pipeline or Pipeline(matrix, options.entry, self.progress.phase, self.cancelled)
        self.base_of = plan.baselines(matrix.scenario, entries)
        self._by_id = {e.id: e for e in entries}
        self._finished: dict[str, ScenarioRecord] = {}  # records of baselines, for compare
        self._held: dict[str, list[str]] = {}  # baseline id -> ids of layouts waiting for its record
        self._host_gpus: list[hardware.Gpu] | None = None  # this host's, for the local pool

    def versions(self) -> dict:
        return self.pipeline.versions(envs.CURRENT)

    def jobs(self) -> list[dispatch.Job]:
        estimates = history.durations(history.db_path(self.options.out_dir))
        jobs = []
        for k, e in enumerate(self.entries, 1):
            gpus = uses_gpus(e.device)
            jobs.append(dispatch.Job(k=k, id=e.id, gpus=e.tp * e.pp if gpus else 0, host=0 if gpus else 1,
                                     estimate=estimates.get(e.id, dispatch.DEFAULT_ESTIMATE)))
        return jobs

    def pool(self) -> dispatch.Bound:
        if self.options.dispatcher == "ray":
            from servematrix.run import ray_tasks

            ray_pool = ray_tasks.pool(self.matrix, self.options, len(self.entries))
            out = self.options.out_dir
            return dispatch.Bound(ray_pool.capacity(), lambda jobs, done: ray_pool.run(
                jobs, lambda job, result: done(job, ray_tasks.unpack(result, out))))
        host_gpus = self._host_gpus = hardware.host_gpus(self.options.gpus)
        local = dispatch.LocalPool([g.index for g in host_gpus], cancel=self.cancel,
                                   eligible=lambda job: self._eligible(self._by_id[job.id], host_gpus))

        def execute(job: dispatch.Job, ids: list[int]) -> EntryOutcome:
            return self.pipeline.execute(job.k, self._by_id[job.id], ids, host_gpus)

        return dispatch.Bound(dispatch.Capacity(gpus=len(host_gpus), host=1),
                              lambda jobs, done: local.run(jobs, execute, done))

    def unrunnable(self, job: dispatch.Job, capacity: dispatch.Capacity) -> EntryOutcome | None:
        """Why no slot of this pool can ever take the job (counted and, on this host, the GPUs' kind)."""
        entry = self._by_id[job.id]
        why = self._why_unrunnable(job, entry, capacity)
        return None if why is None else skipped(entry, self.matrix.scenario(entry.scenario), why)

    def _why_unrunnable(self, job: dispatch.Job, entry: Entry, capacity: dispatch.Capacity) -> str | None:
        if job.gpus == 0:
            return None if capacity.host else (f"needs a CPU-server slot; no node declares the "
                                               f"{dispatch.CPU_SERVER} resource")
        if self._host_gpus is None:  # a Ray cluster: each task checks its node's GPUs itself
            return None if job.gpus <= capacity.gpus else f"needs {job.gpus} GPUs; the cluster has {capacity.gpus}"
        return hardware.unmet(job.gpus, self.matrix.scenario(entry.scenario).requirements(entry.quant),
                              self._host_gpus)

    def _eligible(self, entry: Entry, host_gpus: list[hardware.Gpu]) -> list[int]:
        """Ids of this host's GPUs that meet the entry's requirements."""
        requires = self.matrix.scenario(entry.scenario).requirements(entry.quant)
        return [g.index for g in hardware.qualifying(requires, host_gpus)]

    def cancel(self) -> None:
        self.cancelled.set()
        for server in list(self.pipeline.live):
            server.stop()

    # --- records ----------------------------------------------------------------------------------
    def records(self, outcome: EntryOutcome) -> list[tuple[ScenarioRecord, bool]]:
        """A finished outcome's records: a layout is first compared with its baseline's record,
        held until that one is in (published meanwhile with its pending record); a baseline
        releases the layouts held for it, read back from their outcome files."""
        out = self.options.out_dir
        records.save_outcome(out, outcome)  # first: nothing measured waits in memory only
        base = self.base_of.get(outcome.id)
        if base is None or base == outcome.id:
            rec = judge(outcome)
            self._finished[rec.id] = rec
            return [(rec, True)] + [(judge(self._compare(records.load_outcome(out, held), rec)), True)
                                    for held in self._held.pop(rec.id, [])]
        if base in self._finished:
            return [(judge(self._compare(outcome, self._finished[base])), True)]
        self._held.setdefault(base, []).append(outcome.id)
        return [(records.pending(outcome, base), False)]

    def _compare(self, outcome: EntryOutcome, base: ScenarioRecord) -> EntryOutcome:
        vllm = outcome.vllm_version or self.pipeline.versions(envs.CURRENT).get("vllm")

        def reference(metric: str):
            return self.matrix.references.find(metric, outcome.scenario, outcome.quant, outcome.tp, outcome.pp,
                                               outcome.device, vllm)

        return compare(outcome, base, self.matrix.scenario(outcome.scenario), reference)

    def published(self, rec: ScenarioRecord, n: int) -> None:
        self.progress.done(rec, n)

    def close(self) -> list[ScenarioRecord]:
        self.pipeline.close()  # no load-check world outlives the run
        owed = [judge(records.no_baseline(records.load_outcome(self.options.out_dir, entry_id), base))
                for base, held in self._held.items() for entry_id in held]  # their baseline never finished
        self._held.clear()
        self.progress.close()
        return owed
