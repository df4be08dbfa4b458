"""Backport of vLLM PR #42944: DSA indexer FP8 `wk` under pipeline parallelism (GLM-5.1-FP8,
DeepSeek-V3.2).

vLLM 0.20.0-0.22.1 fuse the indexer's `wk` and `weights_proj` into one BF16 `wk_weights_proj`
and dequantize an FP8 `wk` (+ its 128x128 `weight_scale_inv`) into it with
`_try_load_fp8_indexer_wk`, which runs before the loader's PP-missing check: on a PP rank that does
not hold the layer it looks the fused parameter up anyway and dies with `KeyError:
'layers.0.self_attn.indexer.wk_weights_proj.weight'`. Upstream (0.23.0) passes the PP-missing layer
names in and skips them (`pp_missing_layer_names`, the detection signal). This module wraps the
function so a wk tensor whose fused parameter this rank does not hold (its layer is a
PPMissingLayer, which has no parameters) is consumed and skipped, and rebinds it where other
modules imported it by value (deepseek_mtp).
"""

from __future__ import annotations

import functools
import importlib
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_42944"
_IMPORTERS = ("vllm.model_executor.models.deepseek_v2", "vllm.model_executor.models.deepseek_mtp")


def _loader():
    from vllm.model_executor.models import deepseek_v2

    return deepseek_v2._try_load_fp8_indexer_wk


class DsaIndexerPP(Fix):
    name = "dsa-indexer-pp-42944"
    pr = "https://github.com/vllm-project/vllm/pull/42944"
    architectures = ("GlmMoeDsaForCausalLM", "DeepseekV32ForCausalLM")
    summary = "skip FP8 indexer wk tensors of layers another pipeline stage holds"

    def detect(self) -> tuple[State, str]:
        try:
            loader = _loader()
        except (ImportError, AttributeError) as exc:
            return "n/a", f"no FP8 indexer wk loader in this vLLM ({exc})"
        if "pp_missing_layer_names" in inspect.signature(loader).parameters:
            return "fixed", "_try_load_fp8_indexer_wk takes pp_missing_layer_names"
        return "bug", "_try_load_fp8_indexer_wk looks up the fused parameter on every PP rank"

    def apply(self) -> None:
        import torch

        original = _loader()
        if getattr(original, _MARK, False):
            return

        @functools.wraps(original)
        def _try_load_fp8_indexer_wk(name, tensor, buf, params_dict, loaded_params, *args, **kwargs):
            if "indexer.wk." in name and "wk_weights" not in name:
                fp8_part = tensor.dtype == torch.float8_e4m3fn or "weight_scale_inv" in name
                fused = f"{name.rsplit('.wk.', 1)[0]}.wk_weights_proj.weight"
                if fp8_part and fused not in params_dict:
                    return True  # this layer lives on another pipeline stage
            return original(name, tensor, buf, params_dict, loaded_params, *args, **kwargs)

        setattr(_try_load_fp8_indexer_wk, _MARK, True)
        for module_name in _IMPORTERS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if getattr(module, "_try_load_fp8_indexer_wk", None) is original:
                module._try_load_fp8_indexer_wk = _try_load_fp8_indexer_wk


FIX = DsaIndexerPP()
