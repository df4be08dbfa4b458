"""Session: one matrix run. Claims the run directory, plans the jobs, hands them to a pool (this
host's, or Ray's), and turns each entry's outcome into its record: a layout is first compared with
its baseline's record (held until that one is in), then judged once. Owns what belongs to the
whole run: signals (Ctrl-C / SIGTERM end it as "interrupted", every server stopped), progress, the
reports rewritten as each record arrives, the history row at the end. Every outcome and record is
also written to its entry's directory the moment it exists (`records`), and a layout held for its
baseline is published at once with a pending record, so a SIGKILL loses nothing measured."""

from __future__ import annotations

import threading

from servematrix.check.compare import compare
from servematrix.check.verdict import judge
from servematrix.config import plan
from servematrix.config.devices import uses_gpus
from servematrix.config.matrix import Entry, Matrix
from servematrix.record import EntryOutcome, RunSummary, ScenarioRecord
from servematrix.report import history
from servematrix.run import dispatch, records
from servematrix.run.lifecycle import RunLifecycle
from servematrix.run.options import RunOptions
from servematrix.run.pipeline import Pipeline, skipped
from servematrix.run.progress import Progress
from servematrix.serve import envs, hardware


class Session:
    def __init__(self, matrix: Matrix, entries: list[Entry], options: RunOptions,
                 pipeline: Pipeline | None = None):
        self.matrix, self.entries, self.options = matrix, entries, options
        self.progress = Progress(len(entries))
        self._cancelled = threading.Event()
        self.pipeline = pipeline or Pipeline(matrix, options.entry, self.progress.phase, self._cancelled)
        self.base_of = plan.baselines(matrix.scenario, entries)
        self._finished: dict[str, ScenarioRecord] = {}  # records of baselines, for compare
        self._held: dict[str, list[str]] = {}  # baseline id -> ids of layouts waiting for its record
        self._lock = threading.Lock()
        self._done = 0  # final records published (pending ones are not done)
        self.lifecycle = RunLifecycle(options.out_dir, options.overwrite)  # claim, summary, reports, history

    def run(self) -> RunSummary:
        run = self.lifecycle
        run.claim()  # refused before anything is written
        versions = self.pipeline.versions(envs.CURRENT)
        summary = run.start(self.matrix.spec.name, versions, [e.id for e in self.entries])
        with run.running(cleanup=self._close):
            self._dispatch()
            if self._cancelled.is_set():
                summary.status = "interrupted"
        return summary

    def _close(self) -> None:
        self.pipeline.close()  # no load-check world outlives the run
        for base, held in self._held.items():  # their baseline never finished (interrupted)
            for entry_id in held:
                outcome = records.load_outcome(self.options.out_dir, entry_id)
                self._publish(judge(records.no_baseline(outcome, base)))
        self._held.clear()
        self.progress.close()

    # --- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Plan the jobs, record those no pool could ever run as skipped, hand the rest to the pool."""
        by_id = {e.id: e for e in self.entries}

        def done(job: dispatch.Job, outcome: EntryOutcome) -> bool:
            with self._lock:
                self.finish(outcome)
            if outcome.failure is not None and outcome.failure.kind == "interrupted":
                self._cancelled.set()  # the run ends "interrupted": start nothing more
                return False
            return True

        host_gpus: list[hardware.Gpu] | None = None  # this host's, for the local pool
        if self.options.dispatcher == "ray":
            from servematrix.run import ray_tasks

            ray_pool = ray_tasks.pool(self.matrix, self.options, len(self.entries))
            capacity = ray_pool.capacity()

            def run_pool(jobs: list[dispatch.Job]) -> None:
                ray_pool.run(jobs, lambda job, result: done(job, ray_tasks.unpack(result, self.options.out_dir)))
        else:
            host_gpus = hardware.host_gpus(self.options.gpus)
            capacity = dispatch.Capacity(gpus=len(host_gpus), host=1)
            local = dispatch.LocalPool([g.index for g in host_gpus], cancel=self._cancel,
                                       eligible=lambda job: self._eligible(by_id[job.id], host_gpus))

            def run_pool(jobs: list[dispatch.Job]) -> None:
                local.run(jobs, lambda job, ids: self.pipeline.execute(job.k, by_id[job.id], ids, host_gpus), done)
        runnable = []
        with self.lifecycle.batch():  # every skip is decided now, at once: the reports are written once
            for job in self._jobs():
                entry = by_id[job.id]
                why = self._unrunnable(job, entry, capacity, host_gpus)
                if why is None:
                    runnable.append(job)
                else:
                    done(job, skipped(entry, self.matrix.scenario(entry.scenario), why))
        run_pool(runnable)

    def _jobs(self) -> list[dispatch.Job]:
        estimates = history.durations(history.db_path(self.options.out_dir))
        jobs = []
        for k, e in enumerate(self.entries, 1):
            gpus = uses_gpus(e.device)
            jobs.append(dispatch.Job(k=k, id=e.id, gpus=e.tp * e.pp if gpus else 0, host=0 if gpus else 1,
                                     estimate=estimates.get(e.id, dispatch.DEFAULT_ESTIMATE)))
        return jobs

    def _unrunnable(self, job: dispatch.Job, entry: Entry, capacity: dispatch.Capacity,
                    host_gpus: list[hardware.Gpu] | None) -> str | None:
        """Why no slot of this pool can ever take the job (counted and, on this host, the GPUs' kind)."""
        if job.gpus == 0:
            return None if capacity.host else (f"needs a CPU-server slot; no node declares the "
                                               f"{dispatch.CPU_SERVER} resource")
        if host_gpus is None:  # a Ray cluster: each task checks its node's GPUs itself
            return None if job.gpus <= capacity.gpus else f"needs {job.gpus} GPUs; the cluster has {capacity.gpus}"
        return hardware.unmet(job.gpus, self.matrix.scenario(entry.scenario).requirements(entry.quant), host_gpus)

    def _eligible(self, entry: Entry, host_gpus: list[hardware.Gpu]) -> list[int]:
        """Ids of this host's GPUs that meet the entry's requirements."""
        requires = self.matrix.scenario(entry.scenario).requirements(entry.quant)
        return [g.index for g in hardware.qualifying(requires, host_gpus)]

    def _cancel(self) -> None:
        self._cancelled.set()
        for server in list(self.pipeline.live):
            server.stop()

    # --- records ----------------------------------------------------------------------------------
    def finish(self, outcome: EntryOutcome) -> None:
        """Publish a finished outcome as its record: a layout is first compared with its baseline's
        record, held until that one is in (published meanwhile with its pending record); a baseline
        releases the layouts held for it, read back from their outcome files."""
        out = self.options.out_dir
        records.save_outcome(out, outcome)  # first: nothing measured waits in memory only
        base = self.base_of.get(outcome.id)
        if base is None or base == outcome.id:
            rec = judge(outcome)
            self._finished[rec.id] = rec
            self._publish(rec)
            for held in self._held.pop(rec.id, []):
                self._publish(judge(self._compare(records.load_outcome(out, held), rec)))
        elif base in self._finished:
            self._publish(judge(self._compare(outcome, self._finished[base])))
        else:
            self._held.setdefault(base, []).append(outcome.id)
            self._publish(records.pending(outcome, base), final=False)

    def _compare(self, outcome: EntryOutcome, base: ScenarioRecord) -> EntryOutcome:
        vllm = outcome.vllm_version or self.pipeline.versions(envs.CURRENT).get("vllm")

        def reference(metric: str):
            return self.matrix.references.find(metric, outcome.scenario, outcome.quant, outcome.tp, outcome.pp,
                                               outcome.device, vllm)

        return compare(outcome, base, self.matrix.scenario(outcome.scenario), reference)

    def _publish(self, rec: ScenarioRecord, final: bool = True) -> None:
        """Into summary.json (a pending record is replaced by the final one, which goes last) and
        the entry's record.json, both written before anything else runs."""
        self.lifecycle.publish(rec)
        if final:
            self._done += 1
            self.progress.done(rec, self._done)
