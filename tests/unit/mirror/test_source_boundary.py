"""source.py / inputs.py at the boundary: every file the mirror reads is typed (config.json as
read, a safetensors header, an index weight map, mirror.json) and a value it refuses is one
located line naming the file, the field, what it got and what is accepted; a config.json alone
(or beside its index) is a source whose layout is transformers' class's; header planning is
linear in the tensors outside the layer containers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from servematrix.errors import ConfigError, StateError, UserError
from servematrix.mirror.inputs import LAYERS_MAX
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_local, read_source
from tests.unit.mirror.sources import (REFUSED_BY_TRANSFORMERS, add_embeddings, dense_layers, llama_like, quantized,
                                      write_checkpoint)

# SmolLM2-135M's config.json (huggingface.co/HuggingFaceTB/SmolLM2-135M): LlamaForCausalLM, 30 layers,
# 9 heads / 3 KV heads of 64, tied embeddings. Every value but transformers_version was checked on
# 2026-12-05 against a public LlamaConfig print-out of "HuggingFaceTB/SmolLM2-135M" (a third-party
# README found through the code search index; transformers there adds head_dim and mlp_bias),
# and the shapes against the converted checkpoint test_smollm2.py reads.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "vocab_size": 49152}


def _small(tmp_path, name="ck", **cfg):
    config = {**llama_like("llama", 2, 128, 2, 1, 64, 256, 300), **cfg}
    tensors = add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False)
    return write_checkpoint(tmp_path / name, config, tensors)


def test_a_config_json_alone_is_a_source_laid_out_by_its_class_and_the_twin_plans(tmp_path):
    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2_135M, indent=2))
    by_file = read_source(str(d / "config.json"))
    by_dir = read_source(str(d))
    assert by_file.tensors == by_dir.tensors and by_dir.files == []  # no header was read
    # tied embeddings: transformers' class stores no lm_head, as the published checkpoint does not
    assert "lm_head.weight" not in by_dir.tensors
    assert by_dir.tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert by_dir.tensors["model.embed_tokens.weight"].dtype == "BF16"  # the config's torch_dtype
    plan = plan_twin(by_dir, 2, [1, 3])
    assert plan.ok, [i for i in plan.invariants if not i.holds]


def test_an_index_without_its_shards_keeps_the_layout_to_the_names_it_lists(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    config = {**SMOLLM2_135M, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(config))
    full = read_source(str(d))
    assert "lm_head.weight" in full.tensors
    shard = "model-00001-of-00002.safetensors"
    weight_map = {n: shard for n in full.tensors if n != "lm_head.weight"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    kept = read_source(str(d))
    assert set(kept.tensors) == set(weight_map)
    # a name the class does not build has no dtype or shape without its shard's header: refused, named
    weight_map["model.layers.0.self_attn.k_proj.k_scale"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json: weight_map: 1 tensor\(s\) transformers' "
                                          r"LlamaForCausalLM does not build, e\.g\. 'model\.layers\.0\.self_attn\.k_proj"
                                          r"\.k_scale'"):
        read_source(str(d))


@pytest.mark.parametrize("field, value, accepted", [
    ("num_hidden_layers", 1_000_000_000_000, f"a whole number in 1..{LAYERS_MAX} or null"),
    ("num_hidden_layers", "abc", f"a whole number in 1..{LAYERS_MAX} or null"),
    ("hidden_size", 2.5, "a whole number in 1..1048576 or null"),
    ("num_attention_heads", 0, "a whole number in 1..65536 or null"),
    # a per-layer list where the plan reads one number (it crashed in layout.Structure)
    ("moe_topk", [], "a whole number in 0..65536 or null"),
    ("tie_word_embeddings", "no", "true, false or null"),
    ("architectures", "LlamaForCausalLM", "a list of class names"),
    ("quantization_config", [1, 2], "an object"),
    ("model_type", ["llama"], "a transformers model_type name"),
])
def test_a_config_value_the_mirror_cannot_use_is_refused_at_its_file_line_and_field(tmp_path, field, value, accepted):
    ck = _small(tmp_path)
    config = json.loads((ck / "config.json").read_text())
    config[field] = value
    (ck / "config.json").write_text(json.dumps(config, indent=2))
    line = next(i for i, text in enumerate((ck / "config.json").read_text().splitlines(), 1) if f'"{field}"' in text)
    with pytest.raises(ConfigError) as exc:
        read_source(str(ck))
    assert str(exc.value).startswith(f"{ck / 'config.json'}:{line}: {field}: got ")
    assert f"accepted: {accepted}" in str(exc.value)


def test_published_values_zero_null_and_layer_lists_pass_the_boundary(tmp_path):
    # issue 25: 0 (no shared expert), null and layer-index lists are what real configs carry
    ck = _small(tmp_path, n_shared_experts=0, head_dim=None, mlp_only_layers=[0])
    assert read_source(str(ck)).config["n_shared_experts"] == 0


@pytest.mark.parametrize("entry, said", [
    ({"dtype": "F32", "shape": [128], "data_offsets": "0,512"}, "data_offsets: got '0,512'"),
    ({"dtype": 5, "shape": [128], "data_offsets": [0, 512]}, "dtype: got 5"),
    # a code the format does not have: accepted before, then a KeyError when the twin was written
    ({"dtype": "Q9", "shape": [128], "data_offsets": [0, 512]}, "dtype: got 'Q9'; accepted: a safetensors dtype code: BOOL"),
    ({"dtype": "F32", "shape": [-128], "data_offsets": [0, 512]}, "shape: got [-128]"),
    ([1, 2], "got [1, 2]"),
])
def test_a_damaged_header_entry_is_one_line_naming_the_file_tensor_and_field(tmp_path, entry, said):
    ck = _small(tmp_path)
    path = ck / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"] = entry
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(StateError) as exc:
        read_source(str(ck))
    assert str(exc.value).startswith(f"{path}: corrupt safetensors header: tensor 'model.norm.weight'")
    assert said in str(exc.value) and "accepted: " in str(exc.value)


@pytest.mark.parametrize("index, said", [
    ({"weight_map": ["a", "b"]}, "weight_map: got [\"a\", \"b\"]; accepted: an object of tensor name -> shard file name"),
    ({"weight_map": {"a": "../other/model.safetensors"}}, "weight_map.a: got '../other/model.safetensors'; accepted: "
                                                          "a file name beside the index"),
    ({"weight_map": {"a": "/etc/passwd"}}, "weight_map.a: got '/etc/passwd'"),
    ({"metadata": {}}, "weight_map: missing"),
    ([1], "not a JSON object"),
])
def test_a_damaged_index_is_one_line_naming_the_index_and_field(tmp_path, index, said):
    ck = _small(tmp_path)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as exc:
        read_source(str(ck))
    assert str(exc.value).startswith(str(ck / "model.safetensors.index.json")) and said in str(exc.value)


@pytest.mark.parametrize("text, said", [
    ("{}", "mirror.json: source: missing; accepted: the source a twin was mirrored from"),
    ("{oops", "mirror.json:1: not JSON"),
    ('{"source": "x", "layer_map": {"a": 1}}', "mirror.json:1: layer_map.a"),
    (b'{"source": "\xff"}', "mirror.json:1: not UTF-8: byte 0xff"),
    # found by the fuzz: an entry without `what` was a KeyError in --diff
    ('{"source": "x", "layer_map": {}, "not_mirrored": [{}]}', "mirror.json:1: not_mirrored.0.what: missing"),
])
def test_a_damaged_mirror_json_is_one_line_naming_it(tmp_path, text, said):
    ck = _small(tmp_path)
    (ck / "mirror.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=r"^" + str(ck).replace(".", r"\.") + "/" + said.replace(".", r"\.")
                                           .replace("(", r"\(").replace("[", r"\[")):
        read_source(str(ck))


@pytest.mark.parametrize("raw, said", [
    (b'{"model_type": "llama", "x": "\xff"}', ":1: not UTF-8: byte 0xff"),
    (b'{"model_type": "llama",\n "rms_norm_eps": NaN}', ":2: not JSON this reader takes: NaN"),
    (b'{"model_type": "llama", "hidden_size": ' + b"9" * 5000 + b"}", ":1: not JSON this reader takes: Exceeds the limit"),
    (b'{"model_type": "llama", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", ": not JSON this reader takes: nested"),
])
def test_config_bytes_python_json_chokes_on_are_a_located_line(tmp_path, raw, said):
    ck = _small(tmp_path)
    (ck / "config.json").write_bytes(raw)
    with pytest.raises(ConfigError) as exc:
        read_source(str(ck))
    assert str(exc.value).startswith(str(ck / "config.json") + said)


def test_gpt2_style_spellings_of_the_roles_are_read_as_the_roles():
    # gpt2's config spells the layers / width / heads n_layer / n_embd / n_head (GPT2Config's defaults:
    # 12 layers of 768 wide, the published openai-community/gpt2); its layers sit in transformer.h.N
    layout = read_source("model_type:gpt2")
    assert layout.structure.num_layers == 12 and layout.structure.layer_stem == "transformer.h."


def test_a_family_that_states_its_layer_count_only_as_a_lists_length_is_read_from_the_list():
    # nemotron_h's configuration class (transformers 5) states its layers only as the length of
    # layers_block_type (mirror-families.yaml fields.layer_lists); its default is a 4-layer list
    layout = read_source("model_type:nemotron_h")
    assert layout.structure.num_layers == 4


def test_a_config_only_source_bounds_layers_times_experts(tmp_path):
    d = tmp_path / "moe"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 1024,
                                               "num_local_experts": 4096, "num_experts_per_tok": 2}))
    with pytest.raises(ConfigError, match=r"config\.json: num_hidden_layers x num_local_experts: got 1024 x 4096 = "
                                          r"4,194,304; accepted: at most 65,536"):
        read_source(str(d))


def test_header_planning_is_linear_in_tensors_outside_the_layer_containers(tmp_path, monkeypatch):
    # 10k such tensors took 40 s and 20k 163 s: each one scanned the whole twin for a per-layer
    # namesake; counted in calls of split_name, which that scan made once per twin tensor
    from servematrix.mirror import tensors as tensors_module

    calls = {"n": 0}
    real = tensors_module.split_name

    def counting(name):
        calls["n"] += 1
        return real(name)

    monkeypatch.setattr(tensors_module, "split_name", counting)
    counts = {}
    for extra in (400, 1600):
        config = llama_like("llama", 2, 128, 2, 1, 64, 256, 300)
        t = add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False)
        t.update({f"model.extra_{i}.weight": ("F32", [4]) for i in range(extra)})
        layout = read_local(write_checkpoint(tmp_path / f"x{extra}", config, t))
        calls["n"] = 0
        assert plan_twin(layout, 2, [1, 2]).ok
        counts[extra] = calls["n"]
    assert counts[1600] < 5 * counts[400], counts  # 4x the tensors: ~4x the work (quadratic was ~16x)


CORPUS = sorted((Path(__file__).resolve().parents[3] / "servematrix" / "data" / "configs").glob("*/*.json"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_every_published_config_of_the_corpus_passes_the_boundary_as_a_config_only_source(path):
    # issue 25: `servematrix mirror path/to/config.json` on real published configs (their values:
    # 0, null, lists, nested rope dicts, legacy names; an attention-free Mamba) is read, typed and
    # laid out by the class, not refused by the boundary's ranges or required fields; one transformers
    # itself refuses as published is refused quoting transformers, past the boundary
    if path.parent.name in REFUSED_BY_TRANSFORMERS:
        with pytest.raises(ConfigError, match=f"cannot be built on the meta device.*{REFUSED_BY_TRANSFORMERS[path.parent.name]}"):
            read_source(str(path))
        return
    from servematrix.sweep import multimodal

    if multimodal.is_composite(path.parent.name):  # a composite's text model, through the composite's parts
        import json

        from servematrix.mirror.composite import text_layout

        parts = multimodal.rules().composites[path.parent.name]
        layout = text_layout(json.loads(path.read_text()), parts, str(path))
        assert layout.files == [] and layout.tensors
        return
    layout = read_source(str(path))
    assert layout.files == [] and layout.tensors and layout.model_type == path.parent.name


def test_a_class_that_cannot_be_built_from_its_own_defaults_is_refused_quoting_transformers():
    # transformers' DbrxConfig() defaults leave attn_config without rope_theta, which DbrxForCausalLM
    # reads; the refusal is transformers' own error, not a kwarg the mirror passed back to the class
    with pytest.raises(ConfigError, match=r"^model_type:dbrx: transformers' DbrxForCausalLM cannot be built on the "
                                          r"meta device from its defaults: AttributeError: 'DbrxAttentionConfig' "
                                          r"object has no attribute 'rope_theta'"):
        read_source("model_type:dbrx")


def test_a_published_infinity_in_a_config_is_read_as_a_float_and_nan_stays_refused(tmp_path):
    """Mamba-Codestral-7B's config.json carries time_step_limit [0.0, Infinity] (transformers writes
    float('inf') so); NaN is no value a published config carries (the case above)."""
    from servematrix.mirror.inputs import read_config

    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "mamba2",\n "time_step_limit": [0.0, Infinity], "x": -Infinity}')
    data = read_config(path)
    assert data["time_step_limit"] == [0.0, float("inf")] and data["x"] == float("-inf")
