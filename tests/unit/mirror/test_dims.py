"""dims.py's KV-head rule: under the "cover" policy the twin's KV heads are split at one TP value
and replicated at another (MQA stays MQA; with one TP > 1, split as the source is; the smallest
count valid at every TP), and under "faithful" they follow the source."""

from __future__ import annotations

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
