"""dims.py's KV-head rule: under the "cover" policy the twin's KV heads are split at one TP value
and replicated at another (MQA stays MQA; with one TP > 1, split as the source is; the smallest
count valid at every TP), and under "faithful" they follow the source."""

from __future__ import annotations

import pytest

from servematrix.mirror.dims import choose_kv, kv_class


def test_the_kv_head_rule_splits_at_one_tp_and_replicates_at_another_else_follows_the_source():
    assert choose_kv(8, [1, 2, 4, 8], "cover") == 2
    assert [kv_class(2, t) for t in (2, 4, 8)] == ["split", "replicated", "replicated"]
    assert choose_kv(8, [1, 2, 4, 8], "faithful") == 8
    assert choose_kv(1, [1, 2, 4], "cover") == 1  # MQA stays MQA
    assert choose_kv(4, [1, 2], "cover") == 2  # one TP > 1 cannot do both: split, as the source at TP=2
    assert choose_kv(2, [1, 4], "cover") == 1  # the source replicates at TP=4: the smallest k that does too
    assert choose_kv(16, [1, 3, 6], "cover") == 3  # split at TP=3, replicated at TP=6; 2 would be invalid at TP=3


def test_the_twins_hidden_size_is_a_multiple_of_its_heads_even_with_an_explicit_head_dim():
    # SmolLM2's shape (9 heads, 3 KV heads, head_dim 64) at TP 1 and 3: the twin gets 6 heads, and
    # transformers' LlamaConfig refuses hidden_size 128 for 6 heads although head_dim is given
    from servematrix.mirror.dims import choose_dims

    cfg = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "intermediate_size": 1536}
    dims, _, _ = choose_dims(cfg, [1, 3], {}, {}, "cover")
    heads, hidden = dims["num_attention_heads"][1], dims["hidden_size"][1]
    assert (heads, dims.get("num_key_value_heads", (3, 3))[1]) == (6, 3)
    assert hidden % heads == 0 and hidden % 128 == 0 and hidden < 576
    # where the heads divide the target, the target stays
    dims, _, _ = choose_dims({**cfg, "num_attention_heads": 8, "num_key_value_heads": 8}, [1, 2], {}, {}, "cover")
    assert dims["hidden_size"][1] == 128


def test_the_replicate_policy_gives_fewer_kv_heads_than_every_tp_above_one():
    # #38191's path (KV heads < TP) from a twin of a source that splits at TP=2 (MiniMax-M2: 8 KV heads)
    assert choose_kv(8, [1, 2], "replicate") == 1
    assert kv_class(choose_kv(8, [1, 2], "replicate"), 2) == "replicated"
    # the most KV heads that every TP > 1 still replicates: 2 at TP 4 and 8
    assert choose_kv(8, [1, 4, 8], "replicate") == 2
    assert choose_kv(1, [1, 2], "replicate") == 1


# microsoft/Phi-3-mini-4k-instruct's published config (servematrix/data/configs, with its source): a fused
# qkv_proj of 32 heads and 32 KV heads of 96 (hidden_size 3072 / 32 heads; the family derives head_dim)
def _phi3_mini() -> dict:
    import json

    from servematrix.paths import data_file

    return json.loads((data_file("configs") / "phi3" / "microsoft--Phi-3-mini-4k-instruct.json").read_text())


# the sweep's widening units (data/sweep-quants.yaml `widen`, sweep/rules.py Widen.units), written out:
# fp8 128x128 blocks; awq/gptq packs of 8 outputs and groups of 128 inputs
FP8_128 = {"all": 128, "ffn": 128, "kv_out": 128, "attn_out": 128, "attn_in": 128}
PACK_8_GROUP_128 = {"all": 128, "ffn": 128, "kv_out": 8, "attn_out": 8, "attn_in": 128}


def test_a_fused_qkv_projections_sections_per_rank_come_from_the_configs_head_fields():
    from servematrix.mirror.dims import is_qkv, qkv_sections

    cfg = _phi3_mini()
    assert is_qkv("model.layers.0.self_attn.qkv_proj") and not is_qkv("model.layers.0.self_attn.q_proj")
    assert qkv_sections(cfg, 1) == [3072, 3072, 3072]  # q, k, v: 24 blocks of 128 each, as published
    assert qkv_sections(cfg, 2) == [1536, 1536, 1536]
    # fewer KV heads than ranks: one head replicated on each rank, as vLLM's QKVParallelLinear holds it
    assert qkv_sections({**cfg, "num_key_value_heads": 1}, 2) == [1536, 96, 96]
    assert qkv_sections({**cfg, "num_key_value_heads": 3}, 2) is None  # 3 KV heads do not meet TP=2
    assert qkv_sections({**cfg, "head_dim": 128}, 2) == [2048, 2048, 2048]  # an explicit head_dim wins


@pytest.mark.parametrize("tps", [[1, 2], [1, 2, 4]])
def test_a_twin_widened_for_fp8_blocks_holds_whole_blocks_in_every_qkv_section_per_rank(tps):
    """Phi-3-mini's twin widened for 128x128 blocks keeps the source's head_dim 96 (below a block), so its
    KV heads are split at every TP with enough a rank for whole blocks: at TP 1/2, 8 heads and 8 KV heads,
    each section 384 rows a rank at TP=2. The plan before (8 heads, 2 KV heads) gave each rank 96-row k/v
    sections, which vLLM's load_qkv_weight cut across blocks ("start (8) + length (2) exceeds dimension
    size (9)", phi3 fp8-block tp2)."""
    from servematrix.mirror.dims import choose_dims, kv_class, qkv_sections

    cfg = _phi3_mini()
    dims, _, notes = choose_dims(cfg, tps, {}, {}, "cover", align=FP8_128)
    twin = {**cfg, **{k: v[1] for k, v in dims.items()}}
    heads, kv, hidden = twin["num_attention_heads"], twin["num_key_value_heads"], twin["hidden_size"]
    assert hidden // heads == 96 and "head_dim" not in twin  # the family's derived head_dim, kept
    assert (heads, kv) == ((8, 8) if tps == [1, 2] else (16, 16))  # the fewest, MHA as the source
    for tp in tps:
        assert kv_class(kv, tp) == "split"  # a replicated rank would hold one 96-row head
        assert all(rows % 128 == 0 for rows in qkv_sections(twin, tp)), (tp, qkv_sections(twin, tp))
    assert hidden % (max(tps) * 128) == 0  # o_proj's inputs: whole K blocks a rank
    assert any("KV heads" in n and "96" in n for n in notes)


def test_a_twin_widened_for_awq_groups_keeps_its_kv_heads_where_the_head_is_whole_packs():
    from servematrix.mirror.dims import choose_dims, qkv_sections

    cfg = _phi3_mini()
    dims, _, notes = choose_dims(cfg, [1, 2], {}, {}, "cover", align=PACK_8_GROUP_128)
    twin = {**cfg, **{k: v[1] for k, v in dims.items()}}
    assert twin["num_key_value_heads"] == 2  # the KV rule's own: a 64-wide head is 8 packs already
    assert all(rows % 8 == 0 for tp in (1, 2) for rows in qkv_sections(twin, tp))
    assert all(twin["hidden_size"] // tp % 128 == 0 for tp in (1, 2))
    assert not any("KV heads" in n for n in notes)


def test_an_unwidened_twin_is_planned_as_before():
    from servematrix.mirror.dims import choose_dims

    dims, _, _ = choose_dims(_phi3_mini(), [1, 2], {}, {}, "cover")
    assert {k: v[1] for k, v in dims.items() if k in ("hidden_size", "num_attention_heads", "num_key_value_heads")} == \
        {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}


def test_a_head_no_block_fits_and_no_cpu_kernel_takes_at_the_sources_width_keeps_64_with_kv_heads_making_blocks():
    """microsoft/phi-2's published config (data/configs): 32 heads of 80 (2560 / 32). Widened for 128x128
    blocks, a head of 80 is neither a block nor a size the twin's head_dim invariant takes (multiples of 32),
    so the twin keeps head_dim 64 and splits 4 KV heads, 128 rows a rank at TP=2. Before, the plan raised
    head_dim to the source's 80 and broke that invariant, so phi's fp8-block tp2 cells had no twin."""
    import json

    from servematrix.mirror.dims import choose_dims
    from servematrix.paths import data_file

    cfg = json.loads((data_file("configs") / "phi" / "microsoft--phi-2.json").read_text())
    dims, _, _ = choose_dims(cfg, [1, 2], {}, {}, "cover", align=FP8_128)
    twin = {**cfg, **{k: v[1] for k, v in dims.items()}}
    heads, kv = twin["num_attention_heads"], twin["num_key_value_heads"]
    assert twin["hidden_size"] // heads == 64 and (heads, kv) == (4, 4)
    assert all((kv // tp * 64) % 128 == 0 and (heads // tp * 64) % 128 == 0 for tp in (1, 2))


def test_a_second_spelling_of_a_width_shrinks_alike_a_copy_that_cannot_scale_whole_is_left():
    # nomic-ai/nomic-embed-text-v1.5 publishes n_embd / n_head / n_inner; transformers' NomicBertConfig
    # states hidden_size / num_attention_heads / intermediate_size beside them, and vLLM reads n_embd
    from servematrix.mirror.dims import choose_dims

    cfg = {"hidden_size": 768, "n_embd": 768, "num_attention_heads": 12, "n_head": 12, "num_key_value_heads": 12,
           "intermediate_size": 3072, "n_inner": 3072}
    dims, _, _ = choose_dims(cfg, [1, 2], {}, {}, "cover")
    assert dims["n_embd"][1] == dims["hidden_size"][1] < 768
    assert dims["n_head"][1] == dims["num_attention_heads"][1] < 12
    assert dims["n_inner"][1] == dims["intermediate_size"][1] < 3072
    # a copy with another value scales with its role only where that is whole (mirror-families.yaml
    # `copies`): 1024 x 128 / 768 is not, so it is left
    dims, _, _ = choose_dims({**cfg, "n_embd": 1024}, [1, 2], {}, {}, "cover")
    assert "n_embd" not in dims
