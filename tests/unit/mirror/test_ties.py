"""Counts a family's class ties to other fields stay tied in the twin (mirror-families.yaml
fields.ties): granite-4.0-h's SSM heads fill hidden_size x mamba_expand, and its configuration refuses
a twin whose narrower hidden_size keeps the published 48 heads. A tie marked `source` binds only where
the source keeps it: Falcon-H1 states its SSM width apart (mamba_d_ssm), so its heads are left alone."""

from __future__ import annotations

from servematrix import mirror
from servematrix.sweep import corpus


def _plan(model_type: str):
    entry = corpus.published(model_type)
    assert entry is not None, f"the corpus lists no published {model_type} config"
    return mirror.plan_twin(corpus.layout(entry), 2, [1, 2]), entry.config()


def test_granite_4_h_ssm_heads_shrink_with_the_hidden_size_they_fill():
    plan, published = _plan("granitemoehybrid")
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    # as published: 48 heads x 64 = 1536 x 2
    assert published["mamba_n_heads"] * published["mamba_d_head"] == published["hidden_size"] * published["mamba_expand"]
    twin = plan.spec.config
    assert twin["hidden_size"] < published["hidden_size"]
    assert twin["mamba_n_heads"] * published["mamba_d_head"] == twin["hidden_size"] * published["mamba_expand"]
    assert twin["mamba_n_heads"] % 2 == 0  # TP=2 splits the SSM heads


def test_a_source_tie_leaves_heads_alone_where_the_source_does_not_keep_it():
    plan, published = _plan("falcon_h1")
    assert plan.ok, [f"{i.name}: {i.detail}" for i in plan.invariants if not i.holds]
    # Falcon-H1 7B: 24 heads x 128 = mamba_d_ssm 3072, not hidden_size 3072 x mamba_expand 2
    assert published["mamba_n_heads"] * published["mamba_d_head"] != published["hidden_size"] * published["mamba_expand"]
    assert plan.spec.config.get("mamba_n_heads", published["mamba_n_heads"]) == published["mamba_n_heads"]
