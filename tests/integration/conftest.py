"""Integration tests start real vLLM servers (the CPU build) through the servematrix CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MACHINE_CACHE

REPO = Path(__file__).resolve().parents[2]


def _have_vllm() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(bool(u.find_spec('vllm')))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


# `make test` runs these modules as two pytest-xdist streams (`--dist loadgroup`), each confined to
# its own share of the host's cores (pytest_configure below). A module is the unit a stream takes,
# so its module-scoped runs are made once; modules that must not overlap with each other share a
# group, so one stream runs them one after another.
GROUPS = {
    # the session's one default-matrix run is read by every test of test_default_matrix.py; its Ray
    # comparison starts a Ray cluster, and only one may live on this host at a time (test_ray_sweep.py
    # looks for leftover world actors among all processes)
    "test_default_matrix.py": "default-run-and-ray",
    "test_ray_dispatch.py": "default-run-and-ray",
    "test_ray_sweep.py": "default-run-and-ray",
    # one Podman service, one image store and one compose project (the checkout's) at a time
    "test_containers.py": "podman",
    "test_docker_backend.py": "podman",
}


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        item.add_marker(pytest.mark.xdist_group(GROUPS.get(module, module)))
    if _have_vllm():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed in this interpreter (run `make test`)")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


def pytest_configure(config):
    """An xdist worker confines itself (every thread, so every child it starts: the CLI, vLLM's
    servers, Ray, Podman's service) to its share of the cores: two streams of CPU servers side by
    side then never pin their workers to the same core (serve/server.py omp_bind binds inside the
    allowed cores), which is what made an unconfined two-stream run slower than one stream
    (docs/testing.md). Without xdist, or with fewer cores than workers, nothing changes."""
    if config.getoption("dist", "no") == "loadgroup" and pytest.version_tuple[:2] >= (9, 2):
        # xdist's groups never reach its scheduler there (pytest-xdist #1386): a module's tests would be
        # spread over both streams, each building the module's runs again, two Ray clusters side by side
        raise pytest.UsageError("--dist loadgroup does not group on pytest >= 9.2 (pytest-xdist #1386): "
                                "install pytest<9.2, as pyproject.toml's test extra pins it")
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count:
        return
    cores = sorted(os.sched_getaffinity(0))
    n, count = int(worker.removeprefix("gw")), int(count)
    if len(cores) < count:
        return
    per = len(cores) // count
    share = set(cores[n * per:(n + 1) * per])
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), share)


def servematrix(*args: str, timeout: float = 1500, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI from the repo root, as a user would."""
    return subprocess.run([sys.executable, "-m", "servematrix.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **kw.pop("env", {})}, **kw)


# MACHINE_CACHE: forged and converted checkpoints and release environments, kept across test
# sessions on this machine (CI runs on the developer's machine: a clean clone finds what the last run
# built). Safe to share: every entry is content-addressed (forge/convert paths carry their spec and
# the code that wrote them, paths.code_digest; environments their recipe). Kept apart from the
# user's own cache.
STALE_DAYS = 14  # a forged/converted entry or sweep twin no session has used since is removed (code moved on)


def sweep(out: Path, layouts: str, k: str, cache: str, *extra: str):
    """`servematrix sweep` of the cells `k` selects at `layouts` into `out`, as a user runs it:
    (the process, its records by cell id)."""
    import json

    proc = servematrix("sweep", "--layouts", layouts, "-k", k, *extra, "--out", str(out), "--timeout", "150",
                       timeout=600, env={"SERVEMATRIX_CACHE": cache})
    return proc, {r["id"]: r for r in json.loads((out / "summary.json").read_text())["scenarios"]}


def twin_of(record: dict) -> Path:
    """The twin checkpoint a sweep cell's record loaded (its command line's --model)."""
    import shlex

    argv = shlex.split(record["server_command"])
    return Path(argv[argv.index("--model") + 1])


def _prune(cache: Path) -> None:
    import shutil
    import time

    horizon = time.time() - STALE_DAYS * 86400
    for kind in ("forged", "converted", "sweep-twins"):
        for entry in (cache / kind).glob("*") if (cache / kind).is_dir() else ():
            marker = next((m for m in (entry / "forge.json", entry / "convert.json", entry / "mirror.json",
                                       # a quantized native twin holds its base's native.json too: its own marker first
                                       entry / "native-quantized.json", entry / "native.json")
                           if m.exists()), None)
            if marker is not None and marker.stat().st_mtime < horizon:
                shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_cache():
    """One cache for the whole session (and, by default, every session on this machine), so each
    checkpoint is forged once and each release environment built once. SERVEMATRIX_TEST_CACHE
    names another place (an empty one measures a cold run)."""
    path = os.environ.get("SERVEMATRIX_TEST_CACHE") or str(MACHINE_CACHE)
    Path(path).mkdir(parents=True, exist_ok=True)
    _prune(Path(path))
    os.environ["SERVEMATRIX_TEST_CACHE"] = path
    return path


CONTAINERS_CONF = """\
[containers]
# the sandbox's hard limits are below Podman's defaults: setrlimit would fail
default_ulimits = []
pids_limit = 0
[engine]
# crun fails here ("cgroups in hybrid mode not supported"); runc works
runtime = "runc"
"""


@pytest.fixture(scope="session")
def podman_engine(tmp_path_factory):
    """A real engine behind the Docker API: Debian's Podman serving it on a private socket, and the
    developer-mode image, a root skeleton that runs this host's own Python, venv and checkout through
    read-only mounts (test_docker_backend.py; test_containers.py builds the real image on this
    engine). Skips, saying why, where Podman cannot be had."""
    import shutil
    import tarfile
    import time

    if shutil.which("podman") is None or shutil.which("runc") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("podman/runc are not installed and cannot be here (needs root and apt-get)")
        from servematrix.serve.envs import apt_install

        ok, tail = apt_install(["podman", "runc"])  # one apt at a time: the other stream may be installing
        if not ok:
            pytest.skip(f"apt-get install podman runc failed: {tail}")
    tmp = tmp_path_factory.mktemp("podman")
    (tmp / "containers.conf").write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(tmp / "containers.conf")}
    root = tmp / "rootfs"
    for d in ("usr", "etc", "tmp", "root", "dev", "proc", "sys", "run", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")):
        (root / link).symlink_to(target)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    with tarfile.open(tmp / "rootfs.tar", "w") as tar:
        tar.add(root, arcname=".")
    image = "localhost/servematrix-hostroot:test"
    r = subprocess.run(["podman", "import", str(tmp / "rootfs.tar"), image], capture_output=True, text=True,
                       env=env, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"podman import failed: {r.stderr[-400:]}")
    sock = tmp / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=open(tmp / "service.log", "w"),
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    probe = subprocess.run(["podman", "run", "--rm", "--network", "host", "-v", "/usr:/usr:ro", image, "true"],
                           capture_output=True, text=True, env=env, timeout=300)
    if not sock.exists() or probe.returncode != 0:
        service.terminate()
        pytest.skip(f"Podman cannot run containers here: {probe.stderr[-400:]}")
    yield {"DOCKER_HOST": f"unix://{sock}", "CONTAINERS_CONF": env["CONTAINERS_CONF"]}, image
    service.terminate()
    service.wait(timeout=30)
