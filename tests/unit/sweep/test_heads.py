"""A pooling architecture transformers has no class for, as its family's base model and a head the data
describes (sweep/heads.py, data/sweep-heads.yaml): Qwen2.5-Math-RM's reward model over qwen2's twin."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from servematrix.sweep import drafts, heads, pooling, twins

from .conftest import base_twin_built


def _base_twin(path: Path, hidden: int = 8, vocab: int = 16) -> Path:
    """A tiny qwen2 twin as the mirror writes one: a decoder and its lm_head."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    save_file({"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
               "model.norm.weight": torch.randn(hidden, generator=g).bfloat16(),
               "lm_head.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                  "hidden_size": hidden, "vocab_size": vocab}))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture()
def reward_twin(tmp_path, monkeypatch):
    asked = base_twin_built(monkeypatch, _base_twin(tmp_path / "base"))
    return heads.build("Qwen2ForRewardModel", tmp_path / "twins", 2, [1, 2]), asked


def test_a_described_head_makes_the_architecture_forgeable_as_its_base_s_model_type():
    assert pooling.match("Qwen2ForRewardModel") == ("qwen2", None)
    assert pooling.match("Qwen2ForProcessRewardModel") == ("qwen2", None)
    assert pooling.match("HF_ColBERT") == ("bert", None)  # its base is a pooling class: that class's model_type
    # its base is a native twin (data/sweep-native.yaml: internlm2 has no transformers class): that family's model_type
    assert pooling.match("InternLM2ForRewardModel") == ("internlm2", None)
    model_type, why = pooling.match("LlamaBidirectionalModel")  # no class, no head described: not checkable
    assert model_type is None and "has no class LlamaBidirectionalModel" in why


def test_the_twin_is_the_base_less_its_lm_head_with_the_published_head_shaped_from_the_config(reward_twin):
    twin, asked = reward_twin
    assert asked == ["qwen2"] and twin.ok and twin.architecture == "Qwen2ForRewardModel"
    assert twin.server_args == ["--dtype", "bfloat16", *pooling.SERVER_ARGS]
    path = Path(twin.path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2ForRewardModel"]
    index = json.loads((path / drafts.INDEX).read_text())["weight_map"]
    assert "lm_head.weight" not in index and index["model.norm.weight"] == "model.safetensors"
    with safe_open(str(path / heads.HEAD_FILE), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        assert f.get_tensor("score.0.weight").dtype == torch.bfloat16  # the base twin's float dtype
    assert shapes == {"score.0.weight": (8, 8), "score.0.bias": (8,), "score.2.weight": (1, 8), "score.2.bias": (1,)}
    assert {n for n, f in index.items() if f == heads.HEAD_FILE} == set(shapes)
    assert (path / "tokenizer.json").is_file()


def test_the_head_is_what_lies_outside_the_base_model_s_prefix(reward_twin):
    twin, _ = reward_twin
    assert set(pooling.head_tensors(Path(twin.path))) == {"score.0.weight", "score.0.bias", "score.2.weight",
                                                          "score.2.bias"}


def test_under_a_quantization_the_head_goes_in_float_beside_its_base_s_quantized_twin(reward_twin, tmp_path):
    twin, _ = reward_twin
    assert twin.target is not None and twin.target.model_type == "qwen2"  # what twins.quantize quantizes
    fp8 = _base_twin(tmp_path / "fp8")  # stands for the base's quantized twin
    config = {**json.loads((fp8 / "config.json").read_text()), "quantization_config": {"quant_method": "fp8"}}
    (fp8 / "config.json").write_text(json.dumps(config))
    base = twin.target.model_copy(update={"path": str(fp8), "quant": "fp8-block", "note": "fp8-block: every linear"})
    q = twins.beside(twin, base)
    path = Path(q.path)
    assert q.ok and q.quant == "fp8-block" and q.architecture == "Qwen2ForRewardModel" and path != Path(twin.path)
    written = json.loads((path / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForRewardModel"] and written["quantization_config"]["quant_method"] == "fp8"
    with safe_open(str(path / heads.HEAD_FILE), "pt") as f:
        assert f.get_tensor("score.0.weight").dtype == torch.bfloat16
    assert q.server_args == ["--dtype", "bfloat16", *pooling.SERVER_ARGS] and q.note == "fp8-block: every linear; the head in float"
    gone = twins.beside(twin, base.model_copy(update={"path": None, "reason": "fp8-block: too narrow"}))
    assert not gone.ok and gone.reason == "its base qwen2: fp8-block: too narrow"


def test_a_base_without_a_twin_gives_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(twins, "build", lambda key, *a, **k: twins.Twin(model_type=key, reason="mirror: no", origin="x"))
    twin = heads.build("Qwen2ForRewardModel", tmp_path, 2, [1])
    assert not twin.ok and twin.reason == "its base qwen2 has no twin: mirror: no"


def test_every_head_says_where_its_names_were_read():
    for arch, head in heads.rules().heads.items():
        assert head.names_from and head.tensors and head.prefix, arch


def test_a_base_saved_alone_goes_under_the_wrapper_s_attribute(tmp_path, monkeypatch):
    # ColBERT's checkpoint holds BertModel under `bert.` and its projection `linear` beside it
    base = tmp_path / "bert"
    base.mkdir()
    save_file({"embeddings.word_embeddings.weight": torch.randn(16, 8), "pooler.dense.weight": torch.randn(8, 8)},
              str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8}))
    monkeypatch.setattr(twins, "build", lambda key, *a, **k: twins.Twin(
        model_type="bert", architecture=key, path=str(base), server_args=pooling.SERVER_ARGS, origin="x"))
    twin = heads.build("HF_ColBERT", tmp_path / "twins", 1, [1, 2])
    index = json.loads((Path(twin.path) / drafts.INDEX).read_text())["weight_map"]
    assert set(index) == {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "linear.weight"}
    assert twin.server_args == pooling.SERVER_ARGS  # its base's, not twice
    assert set(pooling.head_tensors(Path(twin.path))) == {"linear.weight"}


def test_a_native_base_s_twin_gets_the_pooling_runner(tmp_path, monkeypatch):
    # a native twin names its (causal-LM) architecture but carries no --runner: the head adds vLLM's pooling runner
    base = _base_twin(tmp_path / "internlm2")
    monkeypatch.setattr(twins, "build", lambda key, *a, **k: twins.Twin(
        model_type="internlm2", architecture=key, path=str(base), server_args=["--dtype", "bfloat16"], origin="x"))
    twin = heads.build("InternLM2ForRewardModel", tmp_path / "twins", 2, [1, 2])
    assert twin.ok and twin.server_args == ["--dtype", "bfloat16", *pooling.SERVER_ARGS]
    assert json.loads((Path(twin.path) / "config.json").read_text())["architectures"] == ["InternLM2ForRewardModel"]
