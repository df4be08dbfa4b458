"""Dispatch: when and where each expanded entry runs.

A job reserves what its server occupies: TP×PP GPUs on a GPU device, or the whole host on a CPU
device (a CPU server binds every core, so two at once would only slow each other down). Jobs are
independent: comparisons between two scenarios (parity, agreement) are made from their records
afterwards (compare.py), so no job waits for another.

One policy serves every pool and the packing benchmark: start the job with the most expected
GPU-seconds that fits in what is free, then the next, backfilling smaller jobs around a large one
that waits (list scheduling, largest area first). With k GPUs the makespan then approaches
max(total GPU-seconds / k, longest job), or the shape bound where wide jobs cannot share a host.

Pools: `LocalPool` (this host; disjoint GPU sets through CUDA_VISIBLE_DEVICES, threads) and
`RayPool` (each job a Ray task that reserves its GPUs, so a matrix spreads over a cluster).
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

CPU_SERVER = "servematrix_cpu_server"  # Ray resource: one CPU-mode server per node at a time
DEFAULT_ESTIMATE = 120.0  # s for a job never timed before (a cold small-model start + smoke)


class Job(BaseModel):
    model_config = ConfigDict(frozen=True)

    k: int  # position in the run, 1-based (progress lines)
    id: str
    gpus: int = 0  # GPUs reserved (TP×PP on a GPU device)
    host: int = 0  # 1: needs the host to itself (a CPU-mode server)
    estimate: float = DEFAULT_ESTIMATE  # expected seconds (the last run's, from history)


class Capacity(BaseModel):
    gpus: int = 0
    host: int = 1

    def fits(self, job: Job) -> bool:
        return job.gpus <= self.gpus and job.host <= self.host

    def take(self, job: Job) -> None:
        self.gpus -= job.gpus
        self.host -= job.host

    def give(self, job: Job) -> None:
        self.gpus += job.gpus
        self.host += job.host


def order(jobs: list[Job]) -> list[Job]:
    """Most expected GPU-seconds first (a CPU job counts as one GPU); the matrix's order among equals."""
    return sorted(jobs, key=lambda j: (-j.estimate * max(j.gpus, 1), j.k))


def pick(ready: list[Job], free: Capacity) -> list[Job]:
    """The jobs to start now, longest first, as many as fit; takes them from `free`."""
    chosen = []
    for job in order(ready):
        if free.fits(job):
            free.take(job)
            chosen.append(job)
    return chosen


def unrunnable(jobs: list[Job], total: Capacity) -> list[Job]:
    return [j for j in jobs if j.gpus > total.gpus or j.host > total.host]


class Plan(BaseModel):
    makespan: float
    gpu_seconds: float
    longest: float
    k: int
    starts: dict[str, float]

    @property
    def bound(self) -> float:
        """The issue's yardstick: max(total GPU-seconds / k, longest scenario)."""
        return max(self.gpu_seconds / self.k, self.longest)

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound if self.bound else 1.0

    shape_bound: float = 0.0  # a lower bound that also counts jobs too wide to share the GPUs


def shape_bound(jobs: list[Job], durations: dict[str, float], gpus: int) -> float:
    """Jobs wider than half the GPUs never overlap one another; while the narrowest of them runs,
    a job wider than what it leaves free cannot run either. So the makespan is at least the wide
    jobs' seconds in series plus the GPU-seconds of those excluded jobs spread over every GPU."""
    wide = [j for j in jobs if 2 * j.gpus > gpus]
    if not wide:
        return 0.0
    left = gpus - min(j.gpus for j in wide)
    excluded = [j for j in jobs if j not in wide and j.gpus > left]
    return sum(durations[j.id] for j in wide) + sum(durations[j.id] * j.gpus for j in excluded) / gpus


def simulate(jobs: list[Job], durations: dict[str, float], gpus: int) -> Plan:
    """Replay `durations` (seconds each job really took) through the dispatch policy on `gpus`
    GPUs: the makespan a LocalPool would reach, with the jobs' estimates as its only knowledge."""
    free = Capacity(gpus=gpus, host=1)
    pending, starts = list(jobs), {}
    events: list[tuple[float, int, Job]] = []
    now = 0.0
    while pending or events:
        for job in pick(pending, free):
            pending.remove(job)
            starts[job.id] = now
            heapq.heappush(events, (now + durations[job.id], job.k, job))
        if not events:
            raise ValueError(f"jobs that never fit in {gpus} GPUs: {[j.id for j in pending]}")
        now, _, job = heapq.heappop(events)
        free.give(job)
    weight = {j.id: max(j.gpus, 1) for j in jobs}
    return Plan(makespan=now, k=gpus, starts=starts, longest=max(durations[j.id] for j in jobs),
                gpu_seconds=sum(durations[j.id] * weight[j.id] for j in jobs),
                shape_bound=shape_bound(jobs, durations, gpus))


Execute = Callable[[Job, list[int]], Any]  # (job, GPU ids) -> result
Done = Callable[[Job, Any], bool]  # -> False to stop starting new jobs (interrupted)


class Bound:
    """A pool with what runs each job bound to it: what run/session.py hands a work's jobs to
    (`run(jobs, done)`), with the slots it has (`capacity`) to tell the jobs it could never run."""

    def __init__(self, capacity: Capacity, run: Callable[[list[Job], Done], None]):
        self.capacity, self._run = capacity, run

    def run(self, jobs: list[Job], done: Done) -> None:
        self._run(jobs, done)


class LocalPool:
    """Jobs on this host. With one slot (a CPU host, or one GPU) they run one after another in the
    calling thread, so Ctrl-C lands where the server is torn down; with more GPUs each job runs on
    its own thread over a disjoint set of GPU ids, and `cancel` is called on Ctrl-C."""

    def __init__(self, gpu_ids: list[int], cancel: Callable[[], None] = lambda: None,
                 eligible: Callable[[Job], list[int]] | None = None):
        # eligible(job): the ids of the GPUs that meet the job's requirements (default: all), so a
        # mixed host gives an FP8 entry its H100, not whichever GPU is free first
        self.gpu_ids, self.cancel = list(gpu_ids), cancel
        self.eligible = eligible or (lambda job: self.gpu_ids)

    def _ids(self, job: Job, free_ids: list[int]) -> list[int] | None:
        """The GPU ids to give `job` from `free_ids`, or None if too few eligible ones are free."""
        ok = set(self.eligible(job))
        ids = [i for i in free_ids if i in ok][:job.gpus]
        return ids if len(ids) == job.gpus else None

    def run(self, jobs: list[Job], execute: Execute, done: Done) -> None:
        if len(self.gpu_ids) <= 1 or all(j.gpus == 0 for j in jobs):
            self._inline(jobs, execute, done)
        else:
            self._threads(jobs, execute, done)

    def _inline(self, jobs: list[Job], execute: Execute, done: Done) -> None:
        for job in order(jobs):
            if not done(job, execute(job, self._ids(job, self.gpu_ids) or [])):
                return

    def _threads(self, jobs: list[Job], execute: Execute, done: Done) -> None:
        free, free_ids = Capacity(gpus=len(self.gpu_ids), host=1), list(self.gpu_ids)
        pending, running = list(jobs), 0
        results: queue.Queue = queue.Queue()
        stop = False

        def work(job: Job, ids: list[int]) -> None:
            try:
                results.put((job, ids, execute(job, ids)))
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatching thread
                results.put((job, ids, exc))

        try:
            while pending or running:
                if not stop:
                    for job in order(pending):
                        ids = self._ids(job, free_ids) if free.fits(job) else None
                        if ids is None:
                            continue
                        free.take(job)
                        pending.remove(job)
                        free_ids = [i for i in free_ids if i not in ids]
                        threading.Thread(target=work, args=(job, ids), daemon=True, name=job.id).start()
                        running += 1
                if not running:
                    break
                job, ids, result = results.get()
                running -= 1
                free.give(job)
                free_ids = sorted(free_ids + ids)
                if isinstance(result, BaseException):
                    raise result
                if not done(job, result):
                    stop = True
        except BaseException:
            # Ctrl-C, or a job that raised: every live server is stopped (their threads then
            # record "interrupted"), what the other jobs still return is recorded, then it goes on up
            self.cancel()
            while running:
                job, _, result = results.get()
                running -= 1
                if not isinstance(result, BaseException):
                    done(job, result)
            raise


class RayPool:
    """Each job a Ray task reserving its GPUs (`num_gpus`) or a CPU node to itself (the
    `servematrix_cpu_server` resource each node declares); all are submitted at once, longest
    first, and Ray places them over the cluster as resources free up. Ctrl-C cancels the tasks
    without force, so each one tears its server down and still returns its record."""

    CANCEL_GRACE = 60.0  # s for cancelled tasks to stop their servers and return

    def __init__(self, remote: Callable, prepare: Callable[[Job], tuple]):
        self.remote, self.prepare = remote, prepare

    @staticmethod
    def capacity() -> Capacity:
        import ray

        res = ray.cluster_resources()
        return Capacity(gpus=int(res.get("GPU", 0)), host=int(res.get(CPU_SERVER, 0)))

    def run(self, jobs: list[Job], done: Done) -> None:
        import ray

        task = ray.remote(self.remote)
        running = {}
        for job in order(jobs):
            opts: dict = {"num_gpus": job.gpus, "num_cpus": 1, "max_retries": 0}
            if job.host:
                opts["resources"] = {CPU_SERVER: job.host}
            running[task.options(name=job.id, **opts).remote(*self.prepare(job))] = job
        try:
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                job = running.pop(ref)
                if not done(job, ray.get(ref)):
                    raise KeyboardInterrupt("a task was interrupted")
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=False)
            ready, rest = ray.wait(list(running), num_returns=len(running), timeout=self.CANCEL_GRACE)
            for ref in ready:
                try:
                    done(running[ref], ray.get(ref))
                except (ray.exceptions.RayError, KeyboardInterrupt):
                    pass
            for ref in rest:
                ray.cancel(ref, force=True)
            raise
