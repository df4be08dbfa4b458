"""Backport of vLLM PR #39862: MiniCPM-V resampler under online quantization.

With `--quantization fp8` on an unquantized MiniCPM-V checkpoint, the FP8 method creates the
resampler's `kv_proj` weight on the meta device (it is materialised while loading). MiniCPM-V
2.5 / 4.0's `init_resampler` then moved the new resampler with `.to(device=..., dtype=...)`, and
model construction died with `NotImplementedError: Cannot copy out of meta tensor`. It needs the
vision tower's hidden size to differ from the text model's (else `kv_proj` is an Identity with no
weight). Upstream (0.20.0) changes only the dtype there and moves the resampler to the device
after the weights are loaded (`MiniCPMVBaseModel._ensure_resampler_device`, the detection
signal). This module does the same for the versions whose `init_resampler` still moves a meta
resampler.
"""

from __future__ import annotations

import functools
import inspect

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_39862"
_VERSIONS = ("MiniCPMV2_5", "MiniCPMV4_0")  # both build a Resampler2_5 and move it at once


def _module():
    from vllm.model_executor.models import minicpmv

    return minicpmv


def _unfixed(module) -> list[type]:
    out = []
    for name in _VERSIONS:
        cls = getattr(module, name, None)
        if cls is not None and "is_meta" not in inspect.getsource(cls.init_resampler):
            out.append(cls)
    return out


class MiniCPMVResampler(Fix):
    name = "minicpmv-resampler-39862"
    pr = "https://github.com/vllm-project/vllm/pull/39862"
    architectures = ("MiniCPMV",)
    summary = "build MiniCPM-V 2.5/4.0's resampler without moving meta weights; move it after loading"

    def detect(self) -> tuple[State, str]:
        try:
            module = _module()
        except ImportError as exc:
            return "n/a", f"no MiniCPM-V in this vLLM ({exc})"
        if hasattr(module.MiniCPMVBaseModel, "_ensure_resampler_device"):
            return "fixed", "MiniCPMVBaseModel moves the resampler after loading (_ensure_resampler_device)"
        if not _unfixed(module):
            return "n/a", "no MiniCPM-V 2.5/4.0 init_resampler that moves a meta resampler"
        return "bug", "init_resampler moves the new resampler (meta weights under online quantization)"

    def apply(self) -> None:
        import torch
        from vllm.platforms import current_platform
        from vllm.utils.torch_utils import set_default_torch_dtype

        module = _module()
        for cls in _unfixed(module):
            if getattr(cls.init_resampler, _MARK, False):
                continue

            @functools.wraps(cls.init_resampler)
            def init_resampler(self, embed_dim, vision_dim, quant_config=None, prefix=""):
                with set_default_torch_dtype(torch.float16):
                    resampler = module.Resampler2_5(
                        num_queries=self.config.query_num, embed_dim=embed_dim, num_heads=embed_dim // 128,
                        kv_dim=vision_dim, quant_config=quant_config, prefix=prefix)
                return resampler.to(dtype=torch.get_default_dtype())  # the device move waits for the weights

            setattr(init_resampler, _MARK, True)
            cls.init_resampler = init_resampler

        base = module.MiniCPMVBaseModel
        if not getattr(base.load_weights, _MARK, False):
            original = base.load_weights

            @functools.wraps(original)
            def load_weights(self, weights):
                loaded = original(self, weights)
                self.resampler.to(current_platform.device_type)
                return loaded

            setattr(load_weights, _MARK, True)
            base.load_weights = load_weights


FIX = MiniCPMVResampler()
