"""The mirror's planning accepts what published config.json files carry (issue 25): the published
MiniMax-M2 config's `"shared_intermediate_size": 0` (no shared expert), null fields, per-layer lists,
nested rope dicts, legacy names the configuration class rewrites. The configs are the corpus the sweep
ships (servematrix/data/configs/, each with its source in index.yaml), read as published, never forged
here; a refusal names the field, its value and what would be accepted."""

from __future__ import annotations

import pytest

from servematrix import mirror
from servematrix.mirror.family_config import missing_fields
from servematrix.mirror.source import config_layout
from servematrix.sweep import corpus
from tests.unit.mirror.sources import REFUSED_BY_TRANSFORMERS


def _plan(model_type: str, **override):
    entry = corpus.published(model_type)
    assert entry is not None, f"the corpus lists no published {model_type} config"
    layout = config_layout({**entry.config(), **override}, f"config:{entry.hub}",
                           drop=("quantization_config",))
    return mirror.plan_twin(layout, 2, [1, 2])


def test_the_published_minimax_m2_config_with_shared_intermediate_size_0_is_planned_and_keeps_the_0():
    config = corpus.published("minimax_m2").config()
    assert config["shared_intermediate_size"] == 0 and config["sliding_window"] is None  # as published
    plan = _plan("minimax_m2")
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    assert plan.spec.config["shared_intermediate_size"] == 0  # no shared expert, like the checkpoint
    assert plan.spec.config["rotary_dim"] == 32  # the published 64 of 128, shrunk with head_dim


def test_a_refusal_names_the_field_its_value_and_what_would_be_accepted():
    plan = _plan("minimax_m2", shared_intermediate_size=-1)
    (broken,) = [i for i in plan.invariants if not i.holds]
    assert broken.name == "forge accepts"
    assert broken.detail == "config.shared_intermediate_size = -1: must be a whole number in 0..262144 (got -1)"


@pytest.mark.parametrize("entry", corpus.entries(), ids=lambda e: e.file)
def test_every_published_config_in_the_corpus_is_planned_within_the_invariants(entry):
    # issue 25's bar is 95 % of the corpus configs transformers can build: every one of these is
    from servematrix.sweep import multimodal

    if multimodal.is_composite(entry.model_type):  # a multimodal composite: text model, towers and connector
        parts = multimodal.rules().composites[entry.model_type]
        plan = mirror.plan_composite(entry.config(), parts, 2, [1, 2], source=f"config:{entry.hub}")
        assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
        return
    if entry.model_type in REFUSED_BY_TRANSFORMERS:
        from servematrix.errors import ConfigError

        with pytest.raises(ConfigError, match=REFUSED_BY_TRANSFORMERS[entry.model_type]):
            corpus.layout(entry)
        return
    layout = corpus.layout(entry)
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]


def test_afmoe_first_dense_layers_go_by_num_dense_layers_and_lfm2_attention_by_full_attn_idxs():
    afmoe = _plan("afmoe")  # Trinity-Nano: num_dense_layers 2, then MoE layers
    assert afmoe.kept_layers[:3] == [0, 1, 2] and afmoe.spec.config["num_dense_layers"] == 2
    lfm2 = _plan("lfm2")  # LFM2-1.2B: full_attn_idxs [2, 5, ...], conv layers between
    assert lfm2.spec.config["full_attn_idxs"] == [lfm2.kept_layers.index(2)]
    # block_dim / conv_dim equal hidden_size in the published config, and shrink with it
    assert lfm2.spec.config["block_dim"] == lfm2.spec.config["conv_dim"] == lfm2.spec.config["hidden_size"]


def test_mimo_v2_flash_hybrid_pattern_and_moe_freq_follow_the_kept_layers():
    plan = _plan("mimo_v2_flash")
    published = corpus.published("mimo_v2_flash").config()
    assert plan.spec.config["hybrid_layer_pattern"] == [published["hybrid_layer_pattern"][s] for s in plan.kept_layers]
    assert plan.spec.config["moe_layer_freq"] == [published["moe_layer_freq"][s] for s in plan.kept_layers]
    # the layer types the class would derive afresh for 3 layers are the kept layers' own
    kinds = ["full_attention" if p == 0 else "sliding_attention" for p in plan.spec.config["hybrid_layer_pattern"]]
    assert plan.spec.config["layer_types"] == kinds


def test_mimo_v2_flash_defaults_map_layer_types_to_the_published_hybrid_pattern():
    from transformers import AutoConfig

    defaults = AutoConfig.for_model("mimo_v2_flash").to_dict()
    filled = missing_fields("mimo_v2_flash", defaults)
    published = corpus.published("mimo_v2_flash").config()
    assert filled["hybrid_layer_pattern"] == published["hybrid_layer_pattern"]
    assert filled["moe_layer_freq"] == published["moe_layer_freq"]


def test_each_pp_rank_of_the_twin_holds_a_layer_past_the_first_dense_ones_where_the_sources_does():
    # Trinity-Nano: 2 dense layers of 56, so at PP=2 each rank of the real model holds MoE layers;
    # vLLM's afmoe refuses a rank without one ("No AfmoeMoE layer found in model.layers.")
    plan = _plan("afmoe")
    per_rank = len(plan.kept_layers) // 2  # vLLM splits the layers evenly over PP ranks
    assert plan.spec.config["num_dense_layers"] == 2 and per_rank > 2
    # a family without first-dense layers keeps the plain bound (layers >= PP)
    assert len(_plan("llama").kept_layers) == 2


def test_a_published_configs_quantization_config_is_dropped_for_the_unquantized_twin():
    # MiniMax-M2 is published in FP8 (its config.json's quantization_config): a config alone has no
    # quantized tensors, so the corpus's twin is the unquantized one, built by the mirror's config-only path
    entry = corpus.published("minimax_m2")
    assert "quantization_config" in entry.config()
    layout = corpus.layout(entry)
    assert "quantization_config" not in layout.config and layout.quant.method is None
    assert layout.tokenizer.chat_template  # the published checkpoint ships one; the twin gets the forge's


@pytest.mark.parametrize("model_type, layers, stem", [("bloom", 70, "transformer.h."), ("nemotron", 32, "model.layers.")])
def test_a_published_config_the_class_defaults_could_not_stand_for_is_planned_from_its_own_values(model_type, layers, stem):
    # bloom's class defaults are a toy (hidden 64 over 8 heads: head_dim 8, which vLLM's CPU attention
    # refuses); nemotron's leave num_key_value_heads null. The published configs are planned instead
    layout = corpus.layout(corpus.published(model_type))
    assert layout.structure.num_layers == layers and layout.structure.layer_stem == stem
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]


def test_falcons_mlp_width_follows_the_hidden_size_as_vllm_builds_it():
    # tiiuae/falcon-rw-1b states no ffn_hidden_size: transformers' FalconConfig derives 4 x hidden_size,
    # and vLLM's falcon.py builds its MLP as 4 x hidden_size whatever the config says, so the twin
    # leaves the field to the class (a shrunk ffn_hidden_size made vLLM's dense_4h_to_h 4x wider than the twin's)
    plan = _plan("falcon")
    assert plan.ok and "ffn_hidden_size" not in plan.spec.config
    assert plan.spec.config["hidden_size"] == 128 and plan.spec.config["num_kv_heads"] == 2


def test_mamba2s_ssm_width_stays_hidden_size_times_expand_as_its_published_config_states_it():
    # Mamba-Codestral-7B states intermediate_size 8192 = hidden_size 4096 x expand 2; vLLM's mamba2.py builds
    # the mixer from intermediate_size, transformers' class writes the tensors from hidden_size x expand, so a
    # width shrunk on its own (64 against 256) had vLLM load a slice of every mixer tensor and pass
    config = corpus.published("mamba2").config()
    assert config["intermediate_size"] == config["hidden_size"] * config["expand"]
    plan = _plan("mamba2")
    twin = plan.spec.config
    expand = twin.get("expand", config["expand"])  # left to the class where it equals its default (2, as published)
    assert plan.ok and twin["intermediate_size"] == twin["hidden_size"] * expand == 256
    assert twin["num_heads"] * twin["head_dim"] == twin["intermediate_size"]


@pytest.mark.parametrize("tps", [[1], [1, 2]])
def test_nomic_berts_twin_keeps_hidden_size_heads_times_head_dim_as_vllm_derives_its_head_size(tps):
    # vLLM's bert_with_rope.py derives the head size as hidden_size // heads (and asserts it); transformers 5.19's
    # NomicBertConfig states a head_dim the published config does not. Planned for TP=1 alone the twin had 1 head,
    # hidden 128 and head_dim 64: vLLM built a Wqkv for 128-wide heads and refused the twin's 192 rows
    entry = corpus.published("nomic_bert")
    layout = config_layout(entry.config(), f"config:{entry.hub}", drop=("quantization_config",))
    plan = mirror.plan_twin(layout, 2, tps)
    c = plan.spec.config
    assert plan.ok and c["n_embd"] == c["hidden_size"] == c["n_head"] * c["head_dim"]
