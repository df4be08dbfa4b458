"""Backport of vLLM PR #38870: DSA indexer weights of FP8 checkpoints (DeepSeek-V3.2, GLM-5.1-FP8).

#38684 fused the indexer's `wk` and `weights_proj` into one unquantized `wk_weights_proj`; FP8
checkpoints store `wk` as FP8 with a 128x128 `weight_scale_inv` (and `weights_proj` in BF16), so
the scale was renamed to `indexer.wk_weights_proj.weight_scale_inv`, which no parameter has:
`KeyError` while loading. That state lived only on upstream main between #38684 and #38870 and is
in no release: releases before the fusion load `wk` separately, and every release with the fusion
dequantizes an FP8 `wk` into it (`_try_load_fp8_indexer_wk`). So on every installable vLLM this
module must report not-applicable or already-fixed; the tests prove that on each release built.

Where the bug is present, the repair dequantizes each FP8 `wk` with its block scale to BF16 in the
weight stream, before the model's loader sees it, which then fuses a plain BF16 `wk` as it does for
unquantized checkpoints (the later upstream approach, done outside the loader).
"""

from __future__ import annotations

import functools
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_38870"


def _module():
    from vllm.model_executor.models import deepseek_v2

    return deepseek_v2


def dequantized(weights):
    """(name, tensor) stream with every FP8 `indexer.wk.weight` + `weight_scale_inv` pair replaced
    by one BF16 `indexer.wk.weight` (block size from the two shapes); all else passes through."""
    import torch

    pending: dict[str, dict] = {}
    for name, tensor in weights:
        if "indexer.wk." not in name or "wk_weights" in name:
            yield name, tensor
            continue
        is_weight = name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn
        is_scale = name.endswith(".weight_scale_inv")
        if not (is_weight or is_scale):
            yield name, tensor
            continue
        prefix = name.rsplit(".wk.", 1)[0]
        entry = pending.setdefault(prefix, {})
        entry["weight" if is_weight else "scale"] = tensor
        if len(entry) == 2:
            del pending[prefix]
            yield f"{prefix}.wk.weight", _dequantize(entry["weight"], entry["scale"])
    for prefix in pending:  # a weight without its scale (or the reverse) is a broken checkpoint
        raise KeyError(f"{prefix}.wk: FP8 weight and weight_scale_inv must both be present")


def _dequantize(weight, scale_inv):
    import torch

    rows, cols = weight.shape
    br, bc = rows // scale_inv.shape[0], cols // scale_inv.shape[1]
    full = scale_inv.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return (weight.float() * full).to(torch.bfloat16)


class DsaIndexerFp8(Fix):
    name = "dsa-indexer-fp8-38870"
    pr = "https://github.com/vllm-project/vllm/pull/38870"
    architectures = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
    summary = "dequantize FP8 indexer wk to BF16 before the fused wk_weights_proj loader sees it"

    def detect(self) -> tuple[State, str]:
        try:
            module = _module()
            indexer = inspect.getsource(module.Indexer.__init__)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            return "n/a", f"no DSA indexer in this vLLM ({exc})"
        if "wk_weights_proj" not in indexer:
            return "n/a", "the indexer loads wk and weights_proj separately (before the #38684 fusion)"
        if hasattr(module, "_try_load_fp8_indexer_wk"):
            return "fixed", "an FP8 wk is dequantized into wk_weights_proj (_try_load_fp8_indexer_wk)"
        if "is_fp4_ckpt" in indexer:
            return "fixed", "the indexer fuses wk_weights_proj only for non-FP8 checkpoints (#38870)"
        return "bug", "wk_weights_proj is fused for every checkpoint and nothing handles an FP8 wk"

    def apply(self) -> None:
        module = _module()
        classes = [module.DeepseekV2ForCausalLM]  # GLM-5.1 and DeepSeek-V3.2 inherit its loader
        try:
            from vllm.model_executor.models import deepseek_mtp

            classes.append(deepseek_mtp.DeepSeekMTP)
        except (ImportError, AttributeError):
            pass
        for cls in classes:
            original = cls.load_weights
            if getattr(original, _MARK, False):
                continue

            @functools.wraps(original)
            def load_weights(self, weights, _original=original):
                return _original(self, dequantized(weights))

            setattr(load_weights, _MARK, True)
            cls.load_weights = load_weights


FIX = DsaIndexerFp8()
