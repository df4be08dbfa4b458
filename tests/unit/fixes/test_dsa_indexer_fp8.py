"""The #38870 backport's weight-stream dequantization gives what vLLM's own FP8 indexer loader
computes; the #42944 backport skips exactly the FP8 wk tensors of layers this rank does not hold."""

import pytest
import torch

from servematrix.checkpoint.quant_pack import fp8_block_quantize

PREFIX = "model.layers.3.self_attn.indexer"


def checkpoint_stream():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    q, s = fp8_block_quantize(w, [128, 128])
    return [(f"{PREFIX}.wk.weight", q), ("model.norm.weight", torch.ones(4)), (f"{PREFIX}.wk.weight_scale_inv", s),
            (f"{PREFIX}.weights_proj.weight", torch.ones(2, 256, dtype=torch.bfloat16))], q, s


def test_38870_stream_dequantizes_fp8_wk_as_vllms_own_loader_does():
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize

    from servematrix_fixes.dsa_indexer_fp8 import dequantized

    stream, q, s = checkpoint_stream()
    out = dict(dequantized(iter(stream)))
    assert list(out) == ["model.norm.weight", f"{PREFIX}.wk.weight", f"{PREFIX}.weights_proj.weight"]
    want = scaled_dequantize(q, s, group_shape=GroupShape(128, 128), out_dtype=torch.bfloat16)
    assert out[f"{PREFIX}.wk.weight"].dtype == torch.bfloat16
    assert torch.equal(out[f"{PREFIX}.wk.weight"], want)


def test_38870_stream_refuses_an_fp8_wk_without_its_scale():
    from servematrix_fixes.dsa_indexer_fp8 import dequantized

    stream, _, _ = checkpoint_stream()
    with pytest.raises(KeyError, match="weight_scale_inv must both be present"):
        list(dequantized(iter(s for s in stream if "scale_inv" not in s[0])))


def test_42944_wrapper_skips_only_fp8_wk_parts_of_layers_missing_on_this_rank(monkeypatch):
    from vllm.model_executor.models import deepseek_v2

    from servematrix_fixes import dsa_indexer_pp

    calls = []

    def upstream_0_20(name, tensor, buf, params_dict, loaded_params):  # the shape of 0.20.2-0.22.1's
        calls.append(name)
        return False

    monkeypatch.setattr(deepseek_v2, "_try_load_fp8_indexer_wk", upstream_0_20)
    assert dsa_indexer_pp.FIX.detect()[0] == "bug"
    dsa_indexer_pp.FIX.apply()
    dsa_indexer_pp.FIX.apply()  # idempotent: wrapped once
    patched = deepseek_v2._try_load_fp8_indexer_wk
    assert patched is not upstream_0_20 and patched.__wrapped__ is upstream_0_20
    stream, q, s = checkpoint_stream()
    held = {"model.layers.0.self_attn.indexer.wk_weights_proj.weight": None}
    assert patched(f"{PREFIX}.wk.weight", q, {}, held, set()) is True  # layer 3 is another stage's
    assert patched(f"{PREFIX}.wk.weight_scale_inv", s, {}, held, set()) is True
    assert calls == []
    bf16 = torch.zeros(128, 256, dtype=torch.bfloat16)  # a BF16 wk goes the stacked path, untouched
    patched(f"{PREFIX}.wk.weight", bf16, {}, held, set())
    patched("model.layers.0.self_attn.indexer.wk.weight", q, {}, held, set())  # a layer this rank holds
    assert calls == [f"{PREFIX}.wk.weight", "model.layers.0.self_attn.indexer.wk.weight"]
