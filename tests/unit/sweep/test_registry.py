"""Registered architectures are matched to this transformers' model_types and classified: forgeable
(the model_type's causal-LM class) or not checkable here, always with a reason."""

import sys

import pytest

from servematrix.errors import StateError
from servematrix.sweep import registry


def test_a_causal_lm_class_of_a_model_type_is_forgeable():
    a = registry.classify("LlamaForCausalLM", "text")
    assert a.forgeable and a.model_type == "llama" and a.reason is None and a.key == "llama"


def test_a_class_shared_by_two_model_types_goes_to_the_one_it_is_named_after():
    # GPT2LMHeadModel is the causal-LM class of gpt2 and of gpt-sw3
    assert registry.classify("GPT2LMHeadModel", "text").model_type == "gpt2"


@pytest.mark.parametrize("arch, text_type", [("Llama4ForCausalLM", "llama4_text"), ("Qwen3_5ForCausalLM", "qwen3_5_text"),
                                              ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text")])
def test_a_class_shared_by_a_composite_config_and_its_text_config_goes_to_the_text_one(arch, text_type):
    # transformers lists Llama4ForCausalLM as the causal-LM class of llama4 (a config wrapping text_config
    # and vision_config) and of llama4_text: a text-only checkpoint of the class carries the text one
    a = registry.classify(arch, "text")
    assert a.forgeable and a.model_type == text_type
    assert text_type.removesuffix("_text") in registry.composite_types()


@pytest.mark.parametrize("kind, words", [("multimodal", "image"), ("speculative", "draft"),
                                         ("transformers-backend", "wrapper"), ("other", "no registry table")])
def test_every_non_generative_table_has_its_reason(kind, words):
    a = registry.classify("LlamaForCausalLM", kind)
    assert not a.forgeable and words in a.reason and a.key == "LlamaForCausalLM"


def test_a_pooling_table_s_architecture_is_classified_by_its_own_class_not_its_table():
    # pooling kinds are sweep/pooling.py's (tests/unit/sweep/test_pooling.py): the class decides
    assert registry.classify("BertForSequenceClassification", "classification").forgeable
    a = registry.classify("LlamaBidirectionalModel", "embedding")
    assert not a.forgeable and "has no class LlamaBidirectionalModel" in a.reason and a.key == "LlamaBidirectionalModel"
    # no transformers class either, but its family's base model and head are described (data/sweep-heads.yaml)
    a = registry.classify("Qwen2ForRewardModel", "reward")
    assert a.forgeable and a.model_type == "qwen2" and a.key == "Qwen2ForRewardModel"


def test_pooling_architectures_of_one_model_type_are_each_their_own_cells_not_aliases():
    archs = registry.architectures({"BertModel": {"kind": "embedding"}, "BertForMaskedLM": {"kind": "embedding"},
                                    "BertForSequenceClassification": {"kind": "classification"}})
    assert all(a.forgeable for a in archs) and sorted(a.key for a in archs) == sorted(a.arch for a in archs)


def test_a_class_transformers_lacks_is_not_checkable_and_says_why():
    a = registry.classify("Param2MoEForCausalLM", "text")
    assert not a.forgeable and a.model_type is None and "has no class Param2MoEForCausalLM" in a.reason


def test_a_class_of_a_model_type_that_is_not_its_causal_lm_class_names_the_one_that_is():
    a = registry.classify("LlamaForSequenceClassification", "text")
    assert not a.forgeable and a.model_type == "llama" and "llama: LlamaForCausalLM" in a.reason


def test_no_architecture_is_dropped_and_an_alias_of_a_swept_model_type_says_which_is_swept():
    reg = {"LlamaForCausalLM": {"kind": "text"}, "Foo3ForCausalLM": {"kind": "text"},
           "LlavaForConditionalGeneration": {"kind": "multimodal"}}
    archs = registry.architectures(reg)
    assert [a.arch for a in archs] == sorted(reg)
    assert all(a.forgeable or a.reason for a in archs)
    # the same class registered twice under two kinds of table: only one cell set per model_type
    twice = registry.architectures({"LlamaForCausalLM": {"kind": "text"}, "MistralForCausalLM": {"kind": "text"}})
    assert {a.model_type for a in twice if a.forgeable} == {"llama", "mistral"}


def test_a_release_that_cannot_list_its_registry_is_one_state_error(tmp_path):
    with pytest.raises(StateError, match="did not list its model registry"):
        _probe_without_vllm(tmp_path)


def _probe_without_vllm(tmp_path):
    """An interpreter whose vllm fails on import."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('no vllm here')\n")
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    return registry.probe(str(fake))
