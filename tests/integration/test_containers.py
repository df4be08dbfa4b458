"""CPU-mode containers for real: the image docker/build-cpu-base.sh builds (a Debian base, vLLM's CPU
build and servematrix inside, nothing of the host's Python mounted), `docker compose --profile cpu
build` through Podman's Docker API, and the `servematrix repro ID --compose` line executed as printed:
the container's greedy tokens must equal the local backend's on the same forged checkpoint, and the
fix plugin's per-process report must come out of the container. The runner image (the suite itself,
FROM that CPU image) runs one scenario with `docker compose --profile runner run`; its reports come out.

The first build downloads vLLM's dependencies from PyPI (the +cpu torch comes from this machine's
wheel); later runs reuse the image, whose tag is a hash of what went into it."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, servematrix

pytestmark = pytest.mark.integration

TINY = ["tiny-llama/tp1-pp1-fp32", "tiny-llama/tp2-pp1-fp32"]
# a fix that inspects vLLM and patches nothing here (vLLM 0.32 has the fix: "already-fixed"): its
# report lines prove the plugin ran in the container's processes without changing the tokens
PROBE_FIX = "minimax-k-norm-38191"
COMPOSE = str(Path(sys.executable).parent / "docker-compose")


def build_cpu(env: dict, build: str, **extra: str) -> str:
    """docker/build-cpu-base.sh's tag (it builds only what is not cached)."""
    t0 = time.monotonic()
    r = subprocess.run(["sh", str(REPO / "docker/build-cpu-base.sh")], cwd=REPO, capture_output=True, text=True,
                       timeout=3600, env={**os.environ, **env, "SERVEMATRIX_BUILD_DIR": build,
                                          "PYTHON": sys.executable, **extra})
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"cpu image {extra}: {r.stdout.strip()} in {time.monotonic() - t0:.0f} s")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cpu_image(podman_engine, tmp_path_factory):
    """The real CPU image (built once per machine: cached by tag), or a skip saying why not."""
    import shutil

    env, _ = podman_engine
    if shutil.which("debootstrap") is None:
        from servematrix.serve.envs import apt_install

        ok, tail = apt_install(["debootstrap"])
        if not ok:
            pytest.skip(f"debootstrap cannot be installed: {tail}")
    build = os.environ.get("SERVEMATRIX_BUILD_DIR") or str(tmp_path_factory.mktemp("cpu-build"))
    return build_cpu(env, build)


def compose_env(env: dict, image: str, bindir: Path) -> dict:
    """The user's shell: `docker` is the Compose binary's `docker compose` (a two-line shim: no Docker
    CLI is installed here), the engine is Podman's socket, the image the one just built."""
    shim = bindir / "docker"
    shim.write_text(f'#!/bin/sh\n[ "$1" = compose ] && shift\nexec {shlex.quote(COMPOSE)} "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, **env, "PATH": f"{bindir}:{os.environ['PATH']}", "CPU_IMAGE": image,
            "COMPOSE_PROJECT_NAME": f"servematrix-test-{os.getpid()}"}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "compose exited before the server was healthy"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"{url} not healthy in {timeout:.0f} s")


def greedy_tokens(summary: dict, entry: str) -> dict[str, list[int]]:
    (r,) = [s for s in summary["scenarios"] if s["id"] == entry]
    return {p["name"]: p["generation"]["token_ids"] for p in r["smoke"]["prompts"] if p.get("generation")}


# what decides whether `docker compose build` of the CPU service succeeds and what the probe below
# reads from its image: the build recipe and the fix plugin, not the rest of servematrix's sources
COMPOSE_INPUTS = ("docker/Dockerfile.vllm", "docker/build-cpu-base.sh", "docker-compose.yml", "pyproject.toml", "fixes")


def compose_tag(cpu_image: str) -> str:
    repo, tag = cpu_image.rsplit(":", 1)
    return f"{repo}:{tag.split('-')[0]}-compose-{inputs_hash(COMPOSE_INPUTS)}"


def test_compose_build_is_real(cpu_image, podman_engine, tmp_path):
    """`docker compose --profile cpu build` through Podman's API, FROM the same Debian base. Compose's
    classic builder does not reuse the layers `podman build` made (measured: a full 6 min rebuild),
    so its image is built once per hash of its recipe (COMPOSE_INPUTS): an edit of servematrix's
    own modules, which cannot change that build's outcome, does not cost every CI run 6 minutes."""
    env, _ = podman_engine
    cenv = compose_env(env, compose_tag(cpu_image), tmp_path)
    have = subprocess.run(["podman", "image", "exists", cenv["CPU_IMAGE"]], env=cenv)
    base = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}",
                           "--filter", "reference=*servematrix-debian*"], capture_output=True, text=True, env=cenv)
    cenv["CPU_BASE"] = base.stdout.split()[0]
    if have.returncode != 0:
        t0 = time.monotonic()
        r = subprocess.run(["docker", "compose", "--profile", "cpu", "build", "vllm-cpu"], cwd=REPO, env=cenv,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        print(f"compose build: {time.monotonic() - t0:.0f} s")
    probe = subprocess.run(["podman", "run", "--rm", cenv["CPU_IMAGE"], "python3", "-c",
                            "import vllm, torch, servematrix_fixes; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, env=cenv, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[-1] == "2.13.0+cpu" and probe.stdout.split()[0].startswith("0.32")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, shared_cache):
    """The local backend serving the same entries of the default matrix (greedy smoke tokens do not
    depend on gsm8k, left out): what the container must reproduce."""
    out = tmp_path_factory.mktemp("local") / "run"
    proc = servematrix("run", "matrix/cpu-smoke.yaml", "-k", ",".join(TINY), "--no-gsm8k", "--out", str(out),
                       env={"SERVEMATRIX_CACHE": shared_cache})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return summary, {r["id"]: r for r in summary["scenarios"]}


@pytest.mark.parametrize("entry", TINY)
def test_compose_repro_gives_the_local_backends_greedy_tokens(entry, cpu_image, podman_engine, shared_cache,
                                                               local_run, tmp_path):
    env, _ = podman_engine
    summary, by_id = local_run
    assert by_id[entry]["verdict"] == "pass", by_id[entry].get("failure")
    expected = greedy_tokens(summary, entry)
    assert expected

    port = 18000 + os.getpid() % 1000
    printed = servematrix("repro", entry, "--compose", "--port", str(port), env={"SERVEMATRIX_CACHE": shared_cache})
    assert printed.returncode == 0, printed.stderr
    (line,) = [x for x in printed.stdout.splitlines() if "docker compose" in x and not x.startswith("#")]
    assert " FIXES='' " in line
    line = line.replace(" FIXES='' ", f" FIXES={PROBE_FIX} ")  # the one change: see PROBE_FIX
    cenv = compose_env(env, cpu_image, tmp_path)
    report = Path(shared_cache) / f"fixes-{port}.jsonl"
    report.unlink(missing_ok=True)
    log = open(tmp_path / "compose.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", line], cwd=REPO, env=cenv, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=900)
        print(f"{entry}: compose up healthy in {time.monotonic() - t0:.0f} s")
        got = container_tokens(entry, port)
    finally:
        down = subprocess.run(["docker", "compose", "--profile", "cpu", "down", "--timeout", "20"], cwd=REPO,
                              env={**cenv, **compose_vars(line)}, capture_output=True, text=True, timeout=300)
        proc.wait(timeout=120)
        log.close()
    assert down.returncode == 0, down.stderr[-2000:]
    assert got == expected, (tmp_path / "compose.log").read_text()[-3000:]
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    report.unlink()  # the report is this test's, in the machine-wide cache: nothing left behind
    tp = int(compose_vars(line)["TP"])
    assert {x["name"] for x in lines} == {PROBE_FIX}
    assert all(x["status"] in {"already-fixed", "not-applicable"} for x in lines), lines
    assert len({x["pid"] for x in lines}) >= tp  # the API server's process and every TP worker load it


def compose_vars(line: str) -> dict[str, str]:
    words = shlex.split(line)
    return dict(w.split("=", 1) for w in words[:words.index("docker")])


def container_tokens(entry: str, port: int) -> dict[str, list[int]]:
    """The entry's smoke prompts, greedy, against the container (the same check the runner does)."""
    from servematrix.check.smoke import run_smoke
    from servematrix.config.matrix import load_matrix

    matrix = load_matrix(REPO / "matrix/cpu-smoke.yaml")
    (e,) = [x for x in matrix.entries if x.id == entry]
    scenario = matrix.scenario(e.scenario)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    smoke = run_smoke(f"http://127.0.0.1:{port}", model, scenario.smoke)
    return {p.name: p.generation.token_ids for p in smoke.prompts if p.generation}


def test_docker_backend_uses_the_real_image_by_default(cpu_image, podman_engine, shared_cache, tmp_path):
    """`--backend docker` with no image, interpreter or mount given: the image build-cpu-base.sh tagged
    under DEFAULT_IMAGE, vLLM and the plugin from inside it, TP=2 parity against TP=1 as locally."""
    env, _ = podman_engine
    out = tmp_path / "run"
    proc = servematrix("run", "matrix/cpu-smoke.yaml", "-k", ",".join(TINY), "--no-gsm8k", "--out", str(out),
                       "--backend", "docker", env={"SERVEMATRIX_CACHE": shared_cache, **env}, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_id = {r["id"]: r for r in json.loads((out / "summary.json").read_text())["scenarios"]}
    assert {k: r["verdict"] for k, r in by_id.items()} == {e: "pass" for e in TINY}
    assert by_id[TINY[1]]["smoke"]["parity"]["ok"] is True
    from servematrix.serve.docker import DEFAULT_IMAGE

    assert f"# servematrix (docker {DEFAULT_IMAGE})" in (out / TINY[1] / "server.log").read_text()


# what the runner image adds to its base (the CPU image's `vllm` stage): its tag hashes these with
# the base's tag
RUNNER_INPUTS = ("docker/Dockerfile.runner", "pyproject.toml", "servematrix", "fixes", "matrix", "scenarios",
                 "references")


def inputs_hash(inputs: tuple[str, ...], seed: str = "") -> str:
    """A hash of the files (and every file under the folders) `inputs` names, relative to the repo."""
    h = hashlib.sha256(seed.encode())
    for rel in inputs:
        root = REPO / rel
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def runner_tag(base: str) -> str:
    return f"localhost/servematrix/runner:{base.rsplit(':', 1)[1].split('-')[0]}-{inputs_hash(RUNNER_INPUTS, base)}"


@pytest.fixture(scope="module")
def runner_image(cpu_image, podman_engine, tmp_path_factory):
    """`docker compose --profile runner build` FROM the CPU image's `vllm` stage, once per tag; an edit
    of servematrix rebuilds only its last layers (measured: docs/backends.md)."""
    env, _ = podman_engine
    image = cpu_image
    deps = build_cpu(env, str(tmp_path_factory.mktemp("cpu-build-stage")), STAGE="vllm")  # cached with cpu_image
    tag = runner_tag(deps)
    cenv = {**compose_env(env, image, tmp_path_factory.mktemp("runner-bin")), "RUNNER_IMAGE": tag,
            "RUNNER_BASE": deps}
    if subprocess.run(["podman", "image", "exists", tag], env=cenv).returncode != 0:
        t0 = time.monotonic()
        r = subprocess.run(["docker", "compose", "--profile", "runner", "build", "runner"], cwd=REPO, env=cenv,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        print(f"runner build: {time.monotonic() - t0:.0f} s")
    # the name compose runs when RUNNER_IMAGE is unset, as build-cpu-base.sh does for the server image
    subprocess.run(["podman", "tag", tag, "servematrix/runner:v0.32.0"], env=cenv, check=True)
    return cenv


def test_the_runner_image_runs_a_scenario_and_its_reports_come_out(runner_image, shared_cache, tmp_path):
    """The suite in its own container: validate and list, then one tiny scenario with the vLLM inside
    the image; summary.json, the reports and the server log land in REPORTS on the host."""
    cenv = {**runner_image, "REPORTS": str(tmp_path / "reports"), "CACHE": shared_cache}
    entry = TINY[0]

    def compose_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "--profile", "runner", "run", "--rm", "-T", "runner", *args],
                              cwd=REPO, env=cenv, capture_output=True, text=True, timeout=timeout)

    try:
        valid = compose_run("validate", "matrix/cpu-smoke.yaml")
        assert valid.returncode == 0, valid.stdout[-2000:] + valid.stderr[-2000:]
        listed = compose_run("list", "matrix/cpu-smoke.yaml")
        assert entry in listed.stdout.split(), listed.stdout + listed.stderr[-2000:]
        t0 = time.monotonic()
        run = compose_run("run", "matrix/cpu-smoke.yaml", "-k", entry, "--no-gsm8k", "--out", "/work/reports/r",
                          timeout=900)
        print(f"runner: {entry} in {time.monotonic() - t0:.0f} s")
    finally:
        subprocess.run(["docker", "compose", "--profile", "runner", "down"], cwd=REPO, env=cenv,
                       capture_output=True, timeout=300)
    out = tmp_path / "reports" / "r"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (record,) = summary["scenarios"]
    assert record["verdict"] == "pass" and record["load"]["ok"] is True
    assert all(greedy_tokens(summary, entry).values()) and len(greedy_tokens(summary, entry)) == 3
    assert summary["vllm_version"].startswith("0.32"), summary.get("vllm_version")
    for name in ("load-success.md", "accuracy.md", "junit.xml", "report.html", f"{entry}/server.log"):
        assert (out / name).is_file(), name
