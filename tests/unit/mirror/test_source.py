"""source.py reads a checkpoint's metadata and never its weights: a checkpoint cut right after its
safetensors headers reads (and mirrors) like the full one; a corrupt header (length, JSON, data
offsets) is a StateError naming the file; a Hugging Face id resolves offline from the HF cache
layout and online from the hub's safetensors metadata with no weights downloaded; a model_type
source carries the config fields real checkpoints have that vLLM reads."""

from __future__ import annotations

import json
import struct

import pytest

from servematrix.errors import StateError, UserError
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_header, read_local, read_source
from tests.unit.mirror.sources import hf_cache_layout, header_only, seed, truncate_to_headers


def test_a_checkpoint_truncated_right_after_its_header_reads_and_mirrors_like_the_full_one(cache, tmp_path):
    _, full = seed("tiny-llama")
    meta = truncate_to_headers(full, tmp_path / "meta-only")
    (st,) = meta.glob("*.safetensors")
    assert st.stat().st_size < (full / "model.safetensors").stat().st_size / 100  # no tensor data at all
    a, b = read_local(full), read_local(meta)
    assert a.tensors == b.tensors and len(b.tensors) == 21
    assert b.tensors["model.layers.1.self_attn.k_proj.weight"].shape == (64, 128)
    plan = plan_twin(b, max_pp=2, tp_values=[1, 2])
    assert plan.ok, [i for i in plan.invariants if not i.holds]


def test_a_corrupt_header_length_is_a_state_error_naming_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b'{"x": 1}')
    with pytest.raises(StateError, match=r"model\.safetensors: corrupt safetensors header: its length field says "
                                         r"1000000000000 bytes") as exc:
        read_header(bad)
    assert isinstance(exc.value, UserError) and str(bad) in str(exc.value)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(StateError, match="shorter than the 8-byte header length"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 5) + b"nojs!")
    with pytest.raises(StateError, match="not JSON"):
        read_header(bad)
    header_only(bad, {"w": ("BF16", [4, 4])})
    data = json.loads(bad.read_bytes()[8:])
    data["w"]["data_offsets"] = [0, 7]  # 4x4 BF16 is 32 bytes
    blob = json.dumps(data).encode()
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(StateError, match=r"tensor 'w' BF16\[4, 4\] spans 7 bytes"):
        read_header(bad)


def test_a_hugging_face_id_resolves_offline_from_the_hf_cache_layout_reading_headers_only(cache, tmp_path, monkeypatch):
    _, seed_dir = seed("tiny-minimax-m2-kvscale")
    snapshot = hf_cache_layout(tmp_path / "hub", "forged/tiny-minimax-m2-kvscale", seed_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layout = read_source("hf:forged/tiny-minimax-m2-kvscale")
    assert layout.kind == "hf" and layout.source == "hf:forged/tiny-minimax-m2-kvscale"
    assert layout.tensors == read_local(snapshot).tensors and layout.quant.kv_scales == 4
    assert "tokenizer.json" in layout.tokenizer.files and layout.tokenizer.chat_template
    assert plan_twin(layout, 2, [1, 2]).ok
    with pytest.raises(StateError, match="config.json is not in the local Hugging Face cache"):
        read_source("hf:forged/not-cached")


def test_a_hub_id_is_never_fetched_and_a_mistyped_org_name_path_is_refused_at_once(cache, tmp_path, monkeypatch):
    # a mistyped local path shaped like ORG/NAME used to become 45 s of hub retries and 12 warning
    # lines; hf:ORG/NAME now reads the local HF cache only, whatever HF_HUB_OFFLINE says
    import time

    import huggingface_hub

    from servematrix.errors import ArgumentError

    def no_network(*a, **kw):
        raise AssertionError("the hub was asked")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ArgumentError, match=r"^SOURCE: 'myorg/mymodel': no such file or directory .*hub ids are never "
                                            r"fetched"):
        read_source("myorg/mymodel")
    with pytest.raises(StateError, match=r"^hf:myorg/mymodel: config.json is not in the local Hugging Face cache; "
                                         r"hub ids are never fetched"):
        read_source("hf:myorg/mymodel")
    assert time.monotonic() - start < 5


def test_model_type_source_carries_the_fields_real_checkpoints_have_that_vllm_reads():
    # vLLM builds DeepSeek-V3's router bias only for topk_method noaux_tc (every released V3-style
    # checkpoint); transformers' defaults lack the field, so without it the twin fails vLLM's loader
    from servematrix.mirror.source import read_model_type

    assert read_model_type("deepseek_v3").config["topk_method"] == "noaux_tc"
    assert "topk_method" not in read_model_type("llama").config
