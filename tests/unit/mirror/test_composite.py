"""A composite's twin plan (mirror/composite.py): its text model planned exactly as a text twin of its
text sub-config, each tower shrunk so every TP splits its heads and FFN, the connector shaped from the
twin's own config fields, ids past the text vocabulary kept at their distance from its end; a config
of another class, or a connector shape naming no field, is refused. Driven by the published
llava-1.5-7b-hf config in the corpus and data/sweep-multimodal.yaml's llava entry."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from servematrix import mirror
from servematrix.errors import ConfigError
from servematrix.mirror.composite import Composite, text_layout, tower_config
from servematrix.sweep import corpus, multimodal

PARTS = multimodal.rules().composites["llava"]


def _published() -> dict:
    return corpus.published("llava").config()


def test_the_text_model_is_planned_as_the_text_twin_of_its_sub_config():
    plan = mirror.plan_composite(_published(), PARTS, 2, [1, 2], source="config:llava")
    alone = mirror.plan_twin(text_layout(_published(), PARTS, "config:llava"), 2, [1, 2])
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    assert plan.spec.config == alone.spec.config and plan.spec.text_model_type == "llama"
    assert plan.spec.text_prefix == "language_model." and plan.spec.text_config_key == "text_config"
    # the published text_config states no size (Llama's defaults are Vicuna-7B's): the plan shrank the defaults
    assert plan.dims["text_config.hidden_size"] == [4096, alone.spec.config["hidden_size"]]
    assert alone.kept_layers == [0, 1]  # two of the published 32 for PP=2
    assert {f"language_model.{n}" for n in alone.forged} <= set(plan.forged)


@pytest.mark.parametrize("tps", [[1, 2], [1, 2, 4], [3]])
def test_the_tower_s_heads_and_ffn_split_at_every_tp_and_its_head_width_is_the_data_s(tps):
    config, changed = tower_config(_published()["vision_config"], PARTS.towers[0], tps)
    heads, ffn = config["num_attention_heads"], config["intermediate_size"]
    assert all(heads % t == 0 and ffn % t == 0 for t in tps)
    assert config["hidden_size"] == heads * PARTS.towers[0].head_dim
    assert ffn == pytest.approx(4 * config["hidden_size"], rel=0.05)  # the published 4096 / 1024
    assert changed["num_hidden_layers"] == [24, PARTS.towers[0].layers]
    assert config["image_size"] == 336 and config["patch_size"] == 14  # what the processor's image shape depends on


def test_the_connector_is_shaped_from_the_twin_s_fields_and_ids_keep_their_distance_from_the_vocabulary_end():
    plan = mirror.plan_composite(_published(), PARTS, 1, [1], source="config:llava")
    extras = {e.name: e.shape for e in plan.spec.extra_tensors}
    text, vision = plan.spec.config["hidden_size"], plan.spec.components[0].config["hidden_size"]
    assert extras["multi_modal_projector.linear_1.weight"] == [text, vision]
    assert extras["multi_modal_projector.linear_2.bias"] == [text]
    vocab = plan.spec.tokenizer.vocab_size
    top = plan.spec.config_json
    assert (top["image_token_index"], top["pad_token_id"], top["vocab_size"]) == (vocab - 64, vocab - 63, vocab)
    assert "text_config" not in top and "vision_config" not in top and "transformers_version" not in top


def test_a_config_of_another_composite_class_is_refused():
    other = {**_published(), "architectures": ["LlavaNextForConditionalGeneration"]}
    with pytest.raises(ConfigError, match="LlavaForConditionalGeneration"):
        mirror.plan_composite(other, PARTS, 2, [1, 2], source="config:x")


def test_a_tower_without_its_sub_config_is_refused_naming_the_key():
    config = {k: v for k, v in _published().items() if k != "vision_config"}
    with pytest.raises(ConfigError, match="vision_config"):
        mirror.plan_composite(config, PARTS, 2, [1, 2], source="config:x")


def test_a_connector_shape_must_name_a_twin_config_field():
    data = PARTS.model_dump()
    with pytest.raises(ValidationError, match="<config key>.<field>"):
        Composite.model_validate({**data, "tensors": {"proj.weight": ["hidden_size"]}})
    with pytest.raises(ValidationError, match="hidden, ffn, heads, layers"):
        Composite.model_validate({**data, "towers": [{**data["towers"][0], "fields": {"hidden": "hidden_size"}}]})


def test_a_tie_sets_a_tower_field_to_another_part_s_twin_value():
    # PaliGemma's shape: the vision tower's projection_dim is its text model's hidden size
    tied = PARTS.model_copy(update={"ties": {"vision_config.projection_dim": "text_config.hidden_size"}})
    plan = mirror.plan_composite(_published(), tied, 2, [1, 2], source="config:llava")
    assert plan.ok
    (tower,) = plan.spec.components
    assert tower.config["projection_dim"] == plan.spec.config["hidden_size"]
    assert plan.dims["vision_config.projection_dim"] == [768, plan.spec.config["hidden_size"]]
    with pytest.raises(ValidationError, match="ties are"):
        Composite.model_validate({**PARTS.model_dump(), "ties": {"projection_dim": "text_config.hidden_size"}})
    with pytest.raises(ConfigError, match="a tie sets a tower's field"):
        mirror.plan_composite(_published(), PARTS.model_copy(update={"ties": {"text_config.x": "vision_config.hidden_size"}}),
                              2, [1, 2], source="config:llava")
