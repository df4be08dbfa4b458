"""family_config.py: the config fields vLLM reads that transformers' configuration class does not
default (mirror-families.yaml model_type_config) are filled where a source lacks them, a
checkpoint's own value wins, a fraction of another field is a rule; and cpu_config's values (the
CPU MoE router's softmax) replace the source's for the twin, each change stated."""

from __future__ import annotations

import pytest

from servematrix.errors import ConfigError
from servematrix.mirror import family_config
from servematrix.mirror.family_config import cpu_overrides, missing_fields


def test_minimax_m2_gets_the_real_checkpoints_rotary_dim_as_half_its_head_dim_and_its_router_fields():
    # MiniMaxAI/MiniMax-M2's config.json: rotary_dim 64 with head_dim 128
    assert missing_fields("minimax_m2", {"head_dim": 128}) == {
        "rotary_dim": 64, "scoring_func": "sigmoid", "use_routing_bias": True}
    assert missing_fields("minimax_m2", {"head_dim": 64})["rotary_dim"] == 32


def test_a_checkpoints_own_value_always_wins_and_other_families_get_nothing():
    got = missing_fields("minimax_m2", {"head_dim": 128, "rotary_dim": 128, "scoring_func": "softmax"})
    assert got == {"use_routing_bias": True}
    assert missing_fields("llama", {"head_dim": 128}) == {}


def test_a_rule_over_a_field_the_config_lacks_is_one_config_error_naming_the_entry(monkeypatch):
    monkeypatch.setattr(family_config, "rules", lambda: {"model_type_config": {"x": {"w": {"of": "nope", "times": 2}}}})
    with pytest.raises(ConfigError, match=r"model_type_config\.x\.w"):
        missing_fields("x", {})


def test_the_cpu_router_takes_softmax_and_says_so_while_a_softmax_source_is_left_alone():
    config, notes = cpu_overrides("minimax_m2", {"scoring_func": "sigmoid", "hidden_size": 128})
    assert config == {"scoring_func": "softmax", "hidden_size": 128}
    assert len(notes) == 1 and "'sigmoid' -> 'softmax'" in notes[0] and "CPU MoE router" in notes[0]
    assert cpu_overrides("minimax_m2", {"scoring_func": "softmax"}) == ({"scoring_func": "softmax"}, [])
    assert cpu_overrides("deepseek_v3", {"scoring_func": "sigmoid"}) == ({"scoring_func": "sigmoid"}, [])


def test_longcat_flash_gets_the_fields_every_published_config_carries_and_vllm_reads():
    # vLLM's longcat_flash.py reads config.mla_scale_q_lora / mla_scale_kv_lora / zero_expert_type;
    # transformers' LongcatFlashConfig has none, the published LongCat-Flash configs carry all three
    from transformers import AutoConfig

    filled = missing_fields("longcat_flash", AutoConfig.for_model("longcat_flash").to_dict())
    assert filled == {"mla_scale_q_lora": True, "mla_scale_kv_lora": True, "zero_expert_type": "identity"}
