"""Backport of vLLM PR #37214: MiniMax-M2 / M2.5 FP8 KV-cache scales in weight loading.

Quantized MiniMax-M2.5 checkpoints (NVIDIA's NVFP4, FP8) carry `self_attn.k_proj.k_scale` and
`v_proj.v_scale`. `MiniMaxM2Model.load_weights` matched them as stacked q/k/v shards ("k_proj" is
in the name), renamed them to `qkv_proj.k_scale` and died with `KeyError:
'layers.0.self_attn.qkv_proj.k_scale'`. The fix sends such names through vLLM's own
`maybe_remap_kv_scale_name` to the attention layer's `attn.k_scale` / `attn.v_scale`; this module
does the same renaming on the weights before the unpatched loader sees them. Fixed upstream in
0.19.0, whose load_weights remaps names ending in (".k_scale", ".v_scale") (the detection signal).
"""

from __future__ import annotations

import functools
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_37214"


def _model():
    from vllm.model_executor.models import minimax_m2

    return minimax_m2.MiniMaxM2Model


class MiniMaxKVScale(Fix):
    name = "minimax-kv-scale-37214"
    pr = "https://github.com/vllm-project/vllm/pull/37214"
    architectures = ("MiniMaxM2ForCausalLM",)
    summary = "load MiniMax-M2 k_proj.k_scale / v_proj.v_scale into attn.k_scale / attn.v_scale"

    def detect(self) -> tuple[State, str]:
        try:
            source = inspect.getsource(_model().load_weights)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            return "n/a", f"no MiniMax-M2 model in this vLLM ({exc})"
        if '(".k_scale", ".v_scale")' in source or "AutoWeightsLoader" in source:
            return "fixed", "MiniMaxM2Model.load_weights remaps .k_scale/.v_scale itself"
        return "bug", "MiniMaxM2Model.load_weights maps k_proj.k_scale onto qkv_proj"

    def apply(self) -> None:
        from vllm.model_executor.model_loader.weight_utils import maybe_remap_kv_scale_name

        model = _model()
        if getattr(model.load_weights, _MARK, False):
            return
        original = model.load_weights

        @functools.wraps(original)
        def load_weights(self, weights):
            params = dict(self.named_parameters())

            def remapped():
                for name, tensor in weights:
                    if name.endswith((".k_scale", ".v_scale")):
                        target = maybe_remap_kv_scale_name(name, params)
                        if target is not None and target in params:
                            name = target  # e.g. layers.0.self_attn.attn.k_scale: no "k_proj" left
                    yield name, tensor

            return original(self, remapped())

        setattr(load_weights, _MARK, True)
        model.load_weights = load_weights


FIX = MiniMaxKVScale()
