"""RayPool on a real one-node Ray cluster that declares 4 fake GPUs: Ray places the jobs, each
holds the GPU ids Ray gave it and no other job overlapping it in time holds the same ones, and
CPU-server jobs never overlap (one servematrix_cpu_server slot)."""

import time

import pytest

from servematrix.run.dispatch import CPU_SERVER, Job, RayPool

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, num_gpus=4, resources={CPU_SERVER: 1}, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_places_jobs_on_disjoint_fake_gpus(cluster):
    def probe(job_id: str, seconds: float):
        import ray as r

        t0 = time.time()
        time.sleep(seconds)
        return job_id, t0, time.time(), tuple(int(i) for i in r.get_gpu_ids())

    jobs = [Job(k=1, id="base", gpus=1, estimate=1.0), Job(k=2, id="tp2", gpus=2, estimate=1.0),
            Job(k=3, id="tp4", gpus=4, estimate=1.5), Job(k=4, id="a", gpus=1, estimate=0.5),
            Job(k=5, id="b", gpus=2, estimate=0.5), Job(k=6, id="cpu1", host=1, estimate=0.5),
            Job(k=7, id="cpu2", host=1, estimate=0.5)]
    spans = {}
    RayPool(probe, lambda j: (j.id, j.estimate)).run(jobs, lambda j, r: spans.setdefault(r[0], r[1:]) and True)
    assert set(spans) == {j.id for j in jobs}
    gpus = {j.id: j.gpus for j in jobs}
    for jid, (_, _, ids) in spans.items():
        assert len(ids) == gpus[jid], (jid, ids)
    for a, (s1, e1, g1) in spans.items():
        for b, (s2, e2, g2) in spans.items():
            if a < b and s1 < e2 and s2 < e1:
                assert not set(g1) & set(g2), f"{a} and {b} overlapped on GPUs {g1} / {g2}"
    c1, c2 = spans["cpu1"], spans["cpu2"]
    assert c1[1] <= c2[0] or c2[1] <= c1[0], "two CPU-mode servers ran at once on one node"


def test_capacity_reads_the_clusters_gpus_and_cpu_server_slots(cluster):
    cap = RayPool.capacity()
    assert (cap.gpus, cap.host) == (4, 1)
