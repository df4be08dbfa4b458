"""Hybrid and SSM families (issue 26, "every mirror refusal goes"): a twin's layer kinds must be the
source's where the class derives them from the index (Jamba's period/offset), from a per-layer string
(NemotronH's hybrid_override_pattern) or states the layer count only as a list's length; counts the
class ties together (Mamba-2's num_heads x head_dim = hidden_size x expand) stay tied. Inputs are the
published configs of the corpus (servematrix/data/configs/) or the class's defaults."""

from __future__ import annotations

from servematrix import mirror
from servematrix.mirror.layout import field_value
from servematrix.mirror.source import config_layout
from servematrix.sweep import corpus


def _plan(model_type: str):
    entry = corpus.published(model_type)
    assert entry is not None, f"the corpus lists no published {model_type} config"
    return mirror.plan_twin(corpus.layout(entry), 2, [1, 2]), entry.config()


def _broken(plan):
    return [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]


def test_jamba_twin_keeps_a_prefix_so_its_period_and_offset_give_the_sources_layer_kinds():
    plan, published = _plan("jamba")
    assert plan.ok, _broken(plan)
    # AI21-Jamba-1.5-Mini: attention at i % 8 == 4, MoE at i % 2 == 1; the first attention layer is 4
    assert plan.kept_layers == [0, 1, 2, 3, 4]
    for key in ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"):
        assert plan.spec.config.get(key, published[key]) == published[key]  # the rule is the source's
    # every source attention layer maps onto the twin's attention layer, every MoE one onto a MoE one
    for i in range(published["num_hidden_layers"]):
        j = plan.layer_map[i]
        assert (i % 8 == 4) == (j % 8 == 4) and (i % 2 == 1) == (j % 2 == 1), (i, j)


def test_nemotron_h_pattern_is_subsampled_and_stated_in_config_json_with_the_layer_count():
    plan, published = _plan("nemotron_h")
    assert plan.ok, _broken(plan)
    pattern = published["hybrid_override_pattern"]  # "M-M-M-M*-...": 52 layers, one character each
    twin_pattern = "".join(pattern[s] for s in plan.kept_layers)
    assert set(twin_pattern) == set(pattern)  # mamba, MLP and attention layers all present
    # the class saves only layers_block_type; vLLM (through the checkpoint's own configuration
    # module) reads the string and the count from config.json as published
    assert plan.spec.config_json["hybrid_override_pattern"] == twin_pattern
    assert plan.spec.config_json["num_hidden_layers"] == len(plan.kept_layers)


def test_a_layer_count_stated_only_as_a_per_layer_lists_length_is_read_from_it():
    config = {"model_type": "nemotron_h", "layers_block_type": ["linear_attention", "mlp", "full_attention"] * 2}
    assert field_value(config, "layers") == (None, 6)
    layout = config_layout({**corpus.published("nemotron_h").config(), "num_hidden_layers": None,
                            "hybrid_override_pattern": None,
                            "layers_block_type": config["layers_block_type"]}, "config:nemotron_h-list")
    assert layout.structure.num_layers == 6


def test_mamba2_twin_keeps_num_heads_times_head_dim_equal_to_hidden_size_times_expand():
    plan = mirror.plan_twin(mirror.read_source("model_type:mamba2"), 2, [1, 2])
    assert plan.ok, _broken(plan)
    cfg = plan.spec.config
    head_dim, expand = cfg.get("head_dim", 64), cfg.get("expand", 2)  # the class's defaults where not stated
    assert cfg["num_heads"] * head_dim == cfg["hidden_size"] * expand
    assert all(cfg["num_heads"] % tp == 0 for tp in (1, 2))


def test_gemma3n_twin_keeps_sliding_and_full_layers_on_both_sides_of_the_kv_sharing_boundary():
    layout = mirror.read_source("model_type:gemma3n_text")
    n, shared = layout.structure.num_layers, layout.config["num_kv_shared_layers"]  # 35 layers, the last 15 share KV
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    cfg = plan.spec.config
    kinds = {(layout.config["layer_types"][s], s >= n - shared) for s in plan.kept_layers}
    assert kinds == {(t, tail) for t in ("sliding_attention", "full_attention") for tail in (False, True)}
    # vLLM's Gemma 3n takes a shared layer's KV from the last layer of its type before the boundary
    first_shared = len(plan.kept_layers) - cfg["num_kv_shared_layers"]
    assert cfg["layer_types"][first_shared - 1] == "full_attention"
    assert cfg["layer_types"][first_shared - 2] == "sliding_attention"
    # one FFN width per layer in the source, all equal: one number the class expands again
    assert cfg["intermediate_size"] == 128 and cfg["vocab_size_per_layer_input"] <= 1024


def test_a_layer_index_list_as_long_as_the_layer_count_is_remapped_not_subsampled():
    # Llama 4's moe_layers lists MoE layer indices (all 48 of them by default): subsampling it as a
    # per-layer list would name source indices the twin does not have
    plan = mirror.plan_twin(mirror.read_source("model_type:llama4_text"), 2, [1, 2])
    assert plan.ok, _broken(plan)
    assert plan.spec.config["moe_layers"] == list(range(len(plan.kept_layers)))


def test_dbrx_widths_in_its_sub_configs_shrink_and_the_class_reads_them_back():
    # the published dbrx-instruct config, less what transformers 5 refuses or drops in it as published
    # (the int moe_normalize_expert_weights; sub-config keys its strict classes do not declare: the
    # ffn_config's uniform_expert_assignment, the saved PretrainedConfig clutter):
    # its widths sit in attn_config / ffn_config
    import dataclasses

    from transformers.models.dbrx.configuration_dbrx import DbrxAttentionConfig, DbrxFFNConfig

    published = corpus.published("dbrx").config()

    def declared(sub: dict, cls) -> dict:  # the sub-config class's own fields (not PretrainedConfig's)
        from transformers import PretrainedConfig

        base = {f.name for f in dataclasses.fields(PretrainedConfig)}
        own = {f.name for f in dataclasses.fields(cls)} - base | {"rope_theta"}  # DBRX's attention reads rope_theta
        return {k: v for k, v in sub.items() if k in own}

    config = {**published, "attn_config": declared(published["attn_config"], DbrxAttentionConfig),
              "ffn_config": {**declared(published["ffn_config"], DbrxFFNConfig), "moe_normalize_expert_weights": 1.0}}
    plan = mirror.plan_twin(config_layout(config, "config:dbrx"), 2, [1, 2])
    assert plan.ok, _broken(plan)
    ffn, attn = plan.spec.config["ffn_config"], plan.spec.config["attn_config"]
    assert ffn["ffn_hidden_size"] < published["ffn_config"]["ffn_hidden_size"] and ffn["ffn_hidden_size"] % 2 == 0
    assert ffn["moe_num_experts"] == 4 and ffn["moe_top_k"] == 2  # >= 2 x top-k, split by TP 2
    assert attn["kv_n_heads"] == 2 and plan.spec.config["n_heads"] % 2 == 0
    assert attn["clip_qkv"] == published["attn_config"]["clip_qkv"]  # what is no width stays the source's


def test_zamba2_adapter_lists_are_counted_like_experts_and_the_twin_keeps_mamba_and_both_hybrid_kinds():
    # Zamba2's shared transformer block holds one LoRA adapter per hybrid layer, saved under the first
    # hybrid layer's name (gate_up_proj_adapter_list.0..8 for the 9 hybrid layers of the defaults)
    layout = mirror.read_source("model_type:zamba2")
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    kinds = layout.config["layers_block_type"]
    assert [kinds[s] for s in plan.kept_layers] == ["linear_attention", "hybrid", "hybrid"]
    hybrids = plan.spec.config["hybrid_layer_ids"] if "hybrid_layer_ids" in plan.spec.config else None
    adapters = {n.split("adapter_list.")[1].split(".")[0] for n in plan.twin if "gate_up_proj_adapter_list" in n}
    assert adapters == {"0", "1"}  # one per twin hybrid layer
    assert hybrids in (None, [1, 2])


def test_hrm_twin_keeps_layers_per_stack_and_lets_the_class_derive_its_inflated_layer_count():
    # HRM's class states num_hidden_layers as num_layers_per_stack x H_cycles x (L_cycles + 1) (128 for
    # its 16 layers a stack); the twin's stacks are what shrink, and the class derives the rest from them
    from transformers import AutoConfig

    layout = mirror.read_source("model_type:hrm_text")
    assert layout.structure.num_layers == layout.config["num_layers_per_stack"] == 16
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    built = AutoConfig.for_model("hrm_text", **plan.spec.config)
    assert built.num_layers_per_stack == len(plan.kept_layers)
    assert built.num_hidden_layers == len(plan.kept_layers) * built.H_cycles * (built.L_cycles + 1)


def _gemma4_heads(plan) -> tuple[dict[int, int], dict[int, int]]:
    """(layer -> head_dim, layer -> KV heads) of the twin's config as transformers reads it per layer."""
    from transformers import AutoConfig

    built = AutoConfig.for_model("gemma4_text", **plan.spec.config)
    layers = range(plan.spec.config["num_hidden_layers"])
    return ({i: built.per_layer_config[i].head_dim for i in layers},
            {i: built.per_layer_config[i].num_key_value_heads for i in layers})


def test_gemma4_twin_keeps_its_full_attention_layers_head_dim_twice_the_sliding_ones():
    # transformers' Gemma 4 config is heterogeneous: its full-attention layers take global_head_dim
    # (512 over head_dim 256), saved as per_layer_config; vLLM's gemma4.py builds each layer from it
    layout = mirror.read_source("model_type:gemma4_text")
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    cfg = plan.spec.config
    head_dims, _ = _gemma4_heads(plan)
    kinds = cfg["layer_types"]
    assert set(kinds) == {"sliding_attention", "full_attention"}
    assert all(head_dims[i] == 2 * cfg["head_dim"] for i, k in enumerate(kinds) if k == "full_attention")
    assert all(head_dims[i] == cfg["head_dim"] for i, k in enumerate(kinds) if k == "sliding_attention")
    # keyed by the twin's own layer indices (the source's were 05, 11, ... of 30)
    assert set(cfg["per_layer_config"]) == {str(i) for i, k in enumerate(kinds) if k == "full_attention"}


# google/gemma-4-12B-it's text config as a public golden-value generator measured it (the public code
# index's id 57886141452: "the measured google/gemma-4-12B-it text config"), the fields it lists
GEMMA4_12B_TEXT = {"model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "hidden_size": 3840,
                   "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "num_global_key_value_heads": 1, "head_dim": 256,
                   "global_head_dim": 512, "vocab_size": 262144, "sliding_window": 1024, "rms_norm_eps": 1e-6,
                   "final_logit_softcapping": 30.0}


def test_gemma4_layer_kinds_the_class_derives_pick_the_kept_layers_and_global_head_dim_shrinks_with_head_dim():
    # the copy states no layer_types: the class derives them (every 6th layer full attention), and the
    # twin keeps a layer of each kind from that list, as it would from a stated one
    layout = config_layout(GEMMA4_12B_TEXT, "config:gemma-4-12B-it")
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    cfg = plan.spec.config
    assert cfg["layer_types"][-1] == "full_attention" and "sliding_attention" in cfg["layer_types"]
    assert all((s + 1) % 6 == 0 for s, k in zip(plan.kept_layers, cfg["layer_types"]) if k == "full_attention")
    # global_head_dim shrunk with head_dim; the class saves it as the full layers' override, as the twin does
    assert cfg["per_layer_config"] == {"1": {"head_dim": 2 * cfg["head_dim"]}}
    head_dims, _ = _gemma4_heads(plan)
    assert all(head_dims[i] == (2 if k == "full_attention" else 1) * cfg["head_dim"]
               for i, k in enumerate(cfg["layer_types"]))


def test_per_layer_overrides_follow_the_kept_layers_and_scale_with_their_roles():
    from servematrix.mirror.plan_config import layer_overrides

    # source layers 5 and 11 override head_dim (512 over 256) and KV heads (2 over 8); the twin keeps 0, 5, 6
    source = {"05": {"head_dim": 512, "num_key_value_heads": 2}, "11": {"head_dim": 512}}
    dims = {"head_dim": (256, 64), "num_key_value_heads": (8, 4)}
    assert layer_overrides(source, [0, 5, 6], dims) == {"1": {"head_dim": 128, "num_key_value_heads": 1}}
    # a width that is no whole share of the twin's takes the twin's own value
    assert layer_overrides({"3": {"num_key_value_heads": 3}}, [3], dims) == {"0": {"num_key_value_heads": 4}}


def test_llama4_twin_keeps_a_prefix_so_vllms_interleave_rule_gives_the_sources_moe_layers():
    # vLLM's llama4.py: layer i is MoE where (i + 1) % interleave_moe_layer_step == 0 (moe_layers unread);
    # the class derives layer_types (chunked, every 4th full attention): the twin keeps one of each too
    layout = config_layout(corpus.published("llama4_text").config(), "config:Llama-4-Maverick")
    plan = mirror.plan_twin(layout, 2, [1, 2])
    assert plan.ok, _broken(plan)
    cfg, step = plan.spec.config, layout.config["interleave_moe_layer_step"]
    assert plan.kept_layers == list(range(len(plan.kept_layers)))
    assert "full_attention" in cfg["layer_types"] and len(set(cfg["layer_types"])) == 2
    assert cfg["moe_layers"] == [j for j in range(len(plan.kept_layers)) if (j + 1) % step == 0]
