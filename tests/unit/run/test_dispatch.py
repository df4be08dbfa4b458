"""The dispatch policy: longest first with backfill, disjoint GPU sets, packing close to the bound."""

import threading
import time

import pytest

from servematrix.run.dispatch import Capacity, Job, LocalPool, pick, shape_bound, simulate, unrunnable


def job(k, id, gpus=1, est=10.0, host=0):
    return Job(k=k, id=id, gpus=gpus, estimate=est, host=host)


def test_the_job_with_most_gpu_seconds_starts_first_and_equals_keep_the_matrix_order():
    jobs = [job(1, "a", est=10), job(2, "b", est=12), job(3, "c", est=10)]
    free = Capacity(gpus=1, host=1)
    assert [j.id for j in pick(jobs, free)] == ["b"]
    assert free.gpus == 0
    assert [j.id for j in pick(jobs, Capacity(gpus=3, host=1))] == ["b", "a", "c"]


def test_pick_backfills_small_jobs_around_one_that_does_not_fit():
    jobs = [job(1, "big", gpus=4, est=100), job(2, "s1", gpus=1, est=5), job(3, "s2", gpus=1, est=5)]
    free = Capacity(gpus=3, host=1)
    assert [j.id for j in pick(jobs, free)] == ["s1", "s2"]


def test_a_cpu_job_takes_the_whole_host_so_cpu_jobs_run_one_at_a_time():
    jobs = [job(1, "x", gpus=0, host=1), job(2, "y", gpus=0, host=1)]
    assert len(pick(jobs, Capacity(gpus=0, host=1))) == 1


def test_jobs_larger_than_the_pool_are_reported_unrunnable():
    jobs = [job(1, "pp8", gpus=8), job(2, "tp2", gpus=2)]
    assert [j.id for j in unrunnable(jobs, Capacity(gpus=4, host=1))] == ["pp8"]


def test_simulation_never_exceeds_the_gpus():
    jobs = [job(1, "base", gpus=1, est=10), job(2, "tp2", gpus=2, est=10), job(3, "tp4", gpus=4, est=30)]
    durations = {"base": 10, "tp2": 10, "tp4": 30}
    plan = simulate(jobs, durations, gpus=4)
    assert plan.starts == {"tp4": 0, "base": 30, "tp2": 30}  # tp4 needs every GPU: nothing overlaps it
    assert plan.makespan == 40
    assert plan.bound == max((10 + 20 + 120) / 4, 30)


def test_a_wide_job_outranks_a_longer_narrow_one_by_gpu_seconds():
    jobs = [job(1, "narrow", gpus=1, est=30), job(2, "wide", gpus=4, est=10)]
    assert [j.id for j in pick(jobs, Capacity(gpus=4, host=1))] == ["wide"]


def test_shape_bound_counts_wide_jobs_in_series_and_what_cannot_run_beside_them():
    jobs = [job(1, "w1", gpus=3), job(2, "w2", gpus=3), job(3, "two", gpus=2), job(4, "one", gpus=1)]
    durations = {"w1": 100, "w2": 100, "two": 40, "one": 50}
    assert shape_bound(jobs, durations, 4) == 200 + 40 * 2 / 4  # "one" fits beside a 3-GPU job
    plan = simulate(jobs, durations, 4)
    assert plan.makespan >= plan.shape_bound and plan.makespan == 240  # "two" can share with no wide job


def test_packing_reaches_the_bound_on_many_independent_jobs():
    jobs = [job(i, f"j{i}", gpus=1 + i % 2, est=10 + i) for i in range(1, 21)]
    plan = simulate(jobs, {j.id: j.estimate for j in jobs}, gpus=4)
    assert plan.ratio <= 1.1


def test_local_pool_runs_concurrent_jobs_on_disjoint_gpu_sets():
    jobs = [job(1, "base", gpus=1, est=0.2), job(2, "dep", gpus=2, est=0.2),
            job(3, "x", gpus=2, est=0.3), job(4, "y", gpus=1, est=0.1)]
    spans, lock = {}, threading.Lock()

    def execute(j, ids):
        t0 = time.monotonic()
        time.sleep(j.estimate)
        with lock:
            spans[j.id] = (t0, time.monotonic(), tuple(ids))
        return j.id

    seen = []
    LocalPool([0, 1, 2, 3]).run(jobs, execute, lambda j, r: seen.append(r) or True)
    assert sorted(seen) == ["base", "dep", "x", "y"]
    for a in spans:
        assert len(spans[a][2]) == next(j.gpus for j in jobs if j.id == a)
        for b in spans:
            overlap = a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
            if overlap:
                assert not set(spans[a][2]) & set(spans[b][2]), (a, b, spans)
    assert len(set().union(*(set(s[2]) for s in spans.values()))) == 4  # packing used every GPU


def test_local_pool_stops_starting_jobs_when_a_result_says_interrupted():
    jobs = [job(i, f"j{i}", gpus=0, host=1) for i in range(1, 4)]
    seen = []
    LocalPool([]).run(jobs, lambda j, ids: j.id, lambda j, r: seen.append(r) or r != "j1")
    assert seen == ["j1"]


def test_an_exception_in_a_pool_thread_reaches_the_caller():
    jobs = [job(1, "a", gpus=1), job(2, "b", gpus=1)]

    def execute(j, ids):
        raise RuntimeError(f"boom {j.id}")

    with pytest.raises(RuntimeError, match="boom"):
        LocalPool([0, 1]).run(jobs, execute, lambda j, r: True)
