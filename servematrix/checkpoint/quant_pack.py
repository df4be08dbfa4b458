"""The numbers of the forge's `quantize:` methods: a float weight [n, k] really quantized into its
method's layout (so dequantizing gives the forged weight back within quantization error), and the
inverse, which the tests use to say so. Layouts (names, shapes, dtypes) are quantize.py's; this
module only fills them, and checks every tensor it writes against them.

Packing follows the formats vLLM's kernels read: AWQ packs 8 nibbles along the output dim in the
order [0, 2, 4, 6, 1, 3, 5, 7] (vLLM's quant_utils.awq_pack), GPTQ packs along the input dim in
order and stores zero - 1 (checkpoint_format gptq, v1), NVFP4 puts two e2m1 codes in a byte, the
first in the low nibble (vLLM's nvfp4 emulation's break_fp4_bytes), with sign in bit 3.
"""

from __future__ import annotations

from servematrix.config.quantize import Awq, Fp8Block, Fp8Tensor, Gptq, Nvfp4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_MAX = 6.0
_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I32": "int32", "U8": "uint8",
          "F8_E4M3": "float8_e4m3fn"}



FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_block_quantize(weight, block: list[int]):
    """(fp8 weight, float32 scale_inv) with scale_inv[i, j] = amax of block (i, j) / FP8_MAX."""
    import torch

    rows, cols = weight.shape
    br, bc = block
    if rows % br or cols % bc:
        raise ValueError(f"shape {list(weight.shape)} is not a multiple of the {block} FP8 block")
    blocks = weight.float().reshape(rows // br, br, cols // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return q, scale.float()


def _dtype(code: str):
    import torch

    return getattr(torch, _TORCH[code])


def quantize_linear(method, weight, model_dtype: str) -> dict:
    """leaf -> tensor of `weight` [n, k] in `method`'s layout, each tensor checked against it."""
    import torch

    n, k = weight.shape
    w = weight.float()
    if isinstance(method, Fp8Block):
        q, scale = fp8_block_quantize(w, method.block)
        out = {"weight": q, "weight_scale_inv": scale}
    elif isinstance(method, Fp8Tensor):
        scale = w.abs().amax().clamp(min=1e-12) / FP8_MAX
        out = {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale}
        if method.input_scale is not None:
            out["input_scale"] = torch.tensor(method.input_scale)
    elif isinstance(method, Awq):
        out = _awq(w, method)
    elif isinstance(method, Gptq):
        out = _gptq(w, method)
    elif isinstance(method, Nvfp4):
        out = _nvfp4(w, method)
    else:
        raise TypeError(f"not a weight method: {method!r}")
    want = method.leaves(n, k, model_dtype)
    result = {}
    for leaf, (code, shape) in want.items():
        t = out[leaf].reshape(shape).to(_dtype(code)) if out[leaf].numel() == _numel(shape) else out[leaf]
        if tuple(t.shape) != shape or t.dtype != _dtype(code):
            raise AssertionError(f"{method.method} {leaf}: wrote {t.dtype}{list(t.shape)}, layout says {code}{list(shape)}")
        result[leaf] = t.contiguous()
    if set(out) != set(want):
        raise AssertionError(f"{method.method}: wrote {sorted(out)}, layout says {sorted(want)}")
    return result


def _numel(shape) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


def _to_int32(packed):
    """int64 holding 32-bit patterns -> int32 with the same bits (two's complement)."""
    import torch

    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _pack(q, bits: int, dim: int, order: list[int] | None = None):
    """Pack unsigned `bits`-bit codes along `dim` (32 // bits per int32), code i of each word taken
    from position order[i] of its run."""
    import torch

    per = 32 // bits
    q = q.to(torch.int64).movedim(dim, -1)
    runs = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    packed = torch.zeros(runs.shape[:-1], dtype=torch.int64)
    for i, pos in enumerate(order or range(per)):
        packed |= runs[..., pos] << (bits * i)
    return _to_int32(packed).movedim(-1, dim)


def _unpack(packed, bits: int, dim: int, order: list[int] | None = None):
    import torch

    per = 32 // bits
    p = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    runs = torch.zeros(*p.shape, per, dtype=torch.int64)
    for i, pos in enumerate(order or range(per)):
        runs[..., pos] = (p >> (bits * i)) & ((1 << bits) - 1)
    return runs.reshape(*p.shape[:-1], p.shape[-1] * per).movedim(-1, dim)


def _groups(w, group: int):
    """w [n, k] -> [k / group, group, n]: AWQ and GPTQ group the input dim, per output column."""
    n, k = w.shape
    return w.t().reshape(k // group, group, n)


def _awq(w, m: Awq) -> dict:
    import torch

    g = _groups(w, m.group_size)
    maxq = (1 << m.bits) - 1
    lo, hi = g.amin(dim=1), g.amax(dim=1)  # [k / group, n]
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], 0, maxq).reshape(-1, w.shape[0])  # [k, n]
    return {"qweight": _pack(q, m.bits, 1, AWQ_ORDER), "qzeros": _pack(zero, m.bits, 1, AWQ_ORDER), "scales": scale}


def _gptq(w, m: Gptq) -> dict:
    import torch

    g = _groups(w, m.group_size)
    maxq = (1 << m.bits) - 1
    mid = (maxq + 1) // 2
    scale = (2 * g.abs().amax(dim=1) / maxq).clamp(min=1e-8)  # symmetric: [-amax, amax] over maxq steps
    q = torch.clamp(torch.round(g / scale[:, None]) + mid, 0, maxq).reshape(-1, w.shape[0])  # [k, n]
    zeros = torch.full_like(scale, mid - 1)  # v1 stores zero - 1
    out = {"qweight": _pack(q, m.bits, 0), "qzeros": _pack(zeros, m.bits, 1), "scales": scale}
    if m.g_idx:
        out["g_idx"] = torch.arange(w.shape[1]) // m.group_size
    return out


def _nvfp4(w, m: Nvfp4) -> dict:
    import torch

    n, k = w.shape
    blocks = w.reshape(n, k // m.group_size, m.group_size)
    global_scale = (w.abs().amax() / (FP4_MAX * FP8_MAX)).clamp(min=1e-12)
    block_scale = (blocks.abs().amax(dim=2) / FP4_MAX / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    effective = (block_scale.float() * global_scale).clamp(min=1e-12)
    x = (blocks / effective[..., None]).reshape(n, k)
    grid = torch.tensor(E2M1)
    mag = torch.bucketize(x.abs().clamp(max=FP4_MAX), (grid[1:] + grid[:-1]) / 2)
    codes = (mag | ((x < 0).to(torch.int64) << 3)).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out = {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}
    if m.input_scale is not None:
        out["input_scale"] = torch.tensor(m.input_scale)
    return out


def dequantize(method, leaves: dict):
    """The float32 weight [n, k] a method's tensors stand for."""
    import torch

    if isinstance(method, Fp8Block):
        q, s = leaves["weight"].float(), leaves["weight_scale_inv"].float()
        bn, bk = method.block
        return q * s.repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    if isinstance(method, Fp8Tensor):
        return leaves["weight"].float() * leaves["weight_scale"].float().reshape(())
    if isinstance(method, (Awq, Gptq)):
        awq = isinstance(method, Awq)
        s = leaves["scales"].float()  # [k / group, n]
        q = _unpack(leaves["qweight"], method.bits, 1 if awq else 0, AWQ_ORDER if awq else None)  # [k, n]
        z = _unpack(leaves["qzeros"], method.bits, 1, AWQ_ORDER if awq else None) + (0 if awq else 1)
        g = method.group_size
        return ((q - z.repeat_interleave(g, 0)) * s.repeat_interleave(g, 0)).t()
    if isinstance(method, Nvfp4):
        p = leaves["weight"].to(torch.int64)
        codes = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)
        vals = torch.tensor(E2M1)[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
        scale = leaves["weight_scale"].float() * leaves["weight_scale_2"].float()
        return vals * scale.repeat_interleave(method.group_size, 1)
    raise TypeError(f"not a weight method: {method!r}")
