"""config/fields.py: the shape templates packaged data declares (a composite's connector, a draft's tensors)."""

import re

import pytest
from pydantic import TypeAdapter, ValidationError

from servematrix.config.fields import shape_templates
from servematrix.mirror import composite
from servematrix.sweep import drafts

FIELD = TypeAdapter(shape_templates(re.compile(r"^(?:[1-9]\d*\*)?[a-z_]+$"), "a config field"))


def test_a_shape_is_ints_and_templates_the_pattern_matches_spaces_ignored():
    shapes = {"eh_proj.weight": ["hidden_size", "2 * hidden_size"], "norm.weight": [64]}
    assert FIELD.validate_python(shapes) == shapes


@pytest.mark.parametrize("shape, named", [(["hidden_size", "Hidden"], "['Hidden']"), ([], "[]"),
                                          (["0*hidden_size"], "['0*hidden_size']")])
def test_a_bad_dimension_or_an_empty_shape_is_refused_naming_the_tensor_and_what_is_accepted(shape, named):
    with pytest.raises(ValidationError) as err:
        FIELD.validate_python({"eh_proj.weight": shape})
    assert f"eh_proj.weight: each dimension is an int or a config field, not {named}" in str(err.value)


def test_the_composite_and_the_draft_data_each_hold_their_own_template_form():
    # a composite's dimension names its config key (text_config.hidden_size); a draft's a config field, bare or a
    # dotted path into a nested config (Gemma 4's assistant: text_config.hidden_size), in sums of products
    assert composite.Shapes is not drafts.Shapes
    ok = {"multi_modal_projector.linear_1.weight": ["text_config.hidden_size", "vision_config.hidden_size"]}
    assert TypeAdapter(composite.Shapes).validate_python(ok) == ok
    assert TypeAdapter(drafts.Shapes).validate_python({**ok, "w": ["hidden_size", "kv_lora_rank+qk_rope_head_dim"]})
    with pytest.raises(ValidationError, match=r"w: each dimension is an int or a target config field"):
        TypeAdapter(drafts.Shapes).validate_python({"w": ["hidden_size-1"]})
    with pytest.raises(ValidationError, match=r"<config key>\.<field> \(K\* allowed\), not \['hidden_size'\]"):
        TypeAdapter(composite.Shapes).validate_python({"w": ["hidden_size"]})
