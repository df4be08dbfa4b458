"""What a forge spec's `quantize:` may ask for: one typed model per method (discriminated by
`method`), the layout each writes for a linear [n, k], and the quantization_config it implies,
spelled as real checkpoints spell it and vLLM 0.32's loaders read it (fp8.py `ignored_layers`,
auto_awq.py `modules_to_not_convert`, auto_gptq.py `dynamic`, modelopt.py's config.json `ignore`).
Layouts (leaf names, shape expressions, dtypes, alignment) are the `schemes` of
data/mirror-families.yaml, the one place that decides them for the forge and the mirror alike.
No torch here (scenario files are validated wherever they are loaded): quant_pack.py writes values.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config.fields import OneLine
from servematrix.config import mirror_families, packaged

Glob = Annotated[OneLine, Field(min_length=1, max_length=256)]
FloatDtype = Literal["float32", "bfloat16", "float16"]
_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


_GLOB = re.compile(r"[*?\[]")


def modules(names: Iterable[str]) -> set[str]:
    """Every tensor name of `names` and every module above it (model.layers.0.mlp.gate.weight gives
    model, model.layers, ..., model.layers.0.mlp.gate and the name itself)."""
    return {".".join(parts[:i]) for parts in (n.split(".") for n in names) for i in range(1, len(parts) + 1)}


def layer_pattern(template: str) -> str:
    """A name template with `{layer}` as a regular expression, the layer's index its group."""
    return re.escape(template).replace(re.escape("{layer}"), r"(\d+)")


def _natural(name: str) -> list:
    """model.layers.2 before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class NotWhole(ValueError):
    pass


@lru_cache(maxsize=1)
def schemes() -> dict[str, Any]:
    return packaged.load_raw(mirror_families.FILE, mirror_families.MirrorFamilies)["schemes"]


def evaluate(expr: Any, env: dict[str, int]) -> int:
    """`k / group`, `ceil(n / block_n)`, `n * 2`, a name or a number; `/` must divide exactly."""
    if isinstance(expr, int):
        return expr

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ceil" and isinstance(node.args[0], ast.BinOp):
            return -(-ev(node.args[0].left) // ev(node.args[0].right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if a % b:
                raise NotWhole(f"{a} / {b}")
            return a // b
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return ev(node.left) * ev(node.right)
        raise ValueError(f"unsupported shape expression {ast.unparse(node)!r}")

    return ev(ast.parse(str(expr), mode="eval").body)


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: ClassVar[str]  # the layout's name in mirror-families.yaml
    quant_method: ClassVar[str]
    unit_field: ClassVar[str] = "tensors"  # the field a misaligned linear is reported at
    method: str  # each method's Literal (declared here first: scenario files list it first)
    # glob over weight names; a module matching `ignore` (itself or a parent) stays unquantized
    tensors: list[Glob] = Field(default_factory=lambda: ["*layers.*_proj.weight"], min_length=1, max_length=64)
    ignore: list[Glob] = Field(default_factory=list, max_length=256)

    def params(self) -> dict[str, int]:
        return {}

    def optional(self) -> set[str]:
        """The scheme's optional leaves this spec writes."""
        return set()

    def float_dtype(self, model_dtype: str) -> str:
        return _CODE[getattr(self, "scales_dtype", None) or model_dtype]

    def scalar_shape(self) -> tuple[int, ...]:
        return ()

    def leaves(self, n: int, k: int, model_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """leaf -> (safetensors dtype, shape) of the linear [n, k] in this layout (raises NotWhole)."""
        env = {**self.params(), "n": n, "k": k}
        out = {}
        for leaf, t in schemes()[self.scheme]["tensors"].items():
            if t.get("optional") and leaf not in self.optional():
                continue
            shape = self.scalar_shape() if t["shape"] == "source" else tuple(evaluate(e, env) for e in t["shape"])
            out[leaf] = (self.float_dtype(model_dtype) if t["dtype"] == "float" else t["dtype"], shape)
        return out

    def misaligned(self, n: int, k: int) -> str | None:
        """Why [n, k] cannot be written in this layout (a dim not a whole number of groups, blocks
        or packs), or None."""
        env = {**self.params(), "n": n, "k": k}
        for dim, unit in schemes()[self.scheme].get("align", {}).items():
            size = evaluate(unit, env)
            if env[dim] % size:
                return (f"{'out' if dim == 'n' else 'in'}_features {env[dim]} is not a multiple of "
                        f"{unit} {size}")
        try:
            self.leaves(n, k, "float32")
        except NotWhole as exc:
            return f"{exc} is not whole"
        return None

    def selects(self, name: str) -> bool:
        if not name.endswith(".weight") or not any(fnmatch.fnmatchcase(name, g) for g in self.tensors):
            return False
        module = name[: -len(".weight")]
        return not any(fnmatch.fnmatchcase(module, g) or fnmatch.fnmatchcase(module, g + ".*") for g in self.ignore)

    # whether vLLM matches this method's list of unquantized modules by name (Fp8Config exactly, AWQ's
    # is_layer_skipped_awq by substring), not as a pattern: a glob of `ignore` is then written as the
    # modules of the checkpoint it names, one entry each, as published configs list them (Qwen3-FP8's
    # `modules_to_not_convert`: "model.layers.0.mlp.gate", ... per layer). GPTQ's `dynamic` takes
    # regular expressions and ModelOpt's `ignore` wildcards: theirs stay patterns
    by_name: ClassVar[bool] = False

    def listed(self, names: Iterable[str] = ()) -> list[str]:
        """`ignore` as this method's config lists it: a glob, where the method matches by name, as
        every tensor name or parent module of `names` (the checkpoint's tensors) it matches; a plain
        name as written; all in natural order (layer by layer), as Qwen's FP8 configs list them."""
        if not self.by_name:
            return list(self.ignore)
        held = modules(names)
        out: set[str] = set()
        for g in self.ignore:
            out |= {m for m in held if fnmatch.fnmatchcase(m, g)} if _GLOB.search(g) else {g}
        return sorted(out, key=_natural)

    def config(self, ignored: list[str]) -> dict[str, Any]:
        """The quantization_config, `ignored` the modules it names as not converted (`listed`)."""
        raise NotImplementedError


class Fp8Block(_Method):
    """FP8 e4m3 weights with one float32 `weight_scale_inv` per [block_n, block_k] block (DeepSeek-V3,
    Qwen3-FP8); the dequantized weight is fp8 x scale_inv."""

    scheme: ClassVar[str] = "fp8_block"
    quant_method: ClassVar[str] = "fp8"
    by_name: ClassVar[bool] = True
    unit_field: ClassVar[str] = "block"
    method: Literal["fp8-block"]
    block: list[Annotated[int, Field(strict=True, ge=1, le=4096)]] = Field(
        default_factory=lambda: [128, 128], min_length=2, max_length=2)

    def params(self) -> dict[str, int]:
        return {"block_n": self.block[0], "block_k": self.block[1]}

    def config(self, ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": self.block,
                **({"ignored_layers": ignored} if ignored else {})}


class Fp8Tensor(_Method):
    """FP8 e4m3 weights with a float32 per-tensor `weight_scale` and, for static activations, the
    `input_scale` the activations are divided by (`input_scale` the value written)."""

    scheme: ClassVar[str] = "fp8_tensor"
    quant_method: ClassVar[str] = "fp8"
    by_name: ClassVar[bool] = True
    method: Literal["fp8-tensor"]
    input_scale: float | None = Field(0.05, gt=0, le=1e6, allow_inf_nan=False)  # None: dynamic activations
    scalars: Literal["0-d", "1-element"] = "0-d"  # the scales' shape: [] or [1]

    def optional(self) -> set[str]:
        return {"input_scale"} if self.input_scale is not None else set()

    def scalar_shape(self) -> tuple[int, ...]:
        return () if self.scalars == "0-d" else (1,)

    def config(self, ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": "fp8", "activation_scheme": "static" if self.input_scale is not None else "dynamic",
                **({"ignored_layers": ignored} if ignored else {})}


class Awq(_Method):
    """AutoAWQ GEMM: int32 `qweight` [k, n / 8] and `qzeros` [k / group, n / 8] packed along the
    output dim in AWQ's order, `scales` [k / group, n]; asymmetric 4-bit, zero point per group."""

    scheme: ClassVar[str] = "awq"
    quant_method: ClassVar[str] = "awq"
    by_name: ClassVar[bool] = True
    unit_field: ClassVar[str] = "group_size"
    method: Literal["awq"]
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128
    scales_dtype: FloatDtype | None = None  # None: the forged model's dtype

    def params(self) -> dict[str, int]:
        return {"group": self.group_size, "pack": 32 // self.bits}

    def config(self, ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size, "version": "gemm",
                "zero_point": True, "modules_to_not_convert": ignored or None}


class Gptq(_Method):
    """AutoGPTQ (checkpoint_format gptq, v1 zeros): int32 `qweight` [k / pack, n] packed along the
    input dim, `qzeros` [k / group, n / pack] (zero - 1, as v1 stores it), `scales` [k / group, n],
    `g_idx` [k]; symmetric."""

    scheme: ClassVar[str] = "gptq"
    quant_method: ClassVar[str] = "gptq"
    unit_field: ClassVar[str] = "group_size"
    method: Literal["gptq"]
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    g_idx: bool = True
    scales_dtype: FloatDtype | None = None

    def params(self) -> dict[str, int]:
        return {"group": self.group_size, "pack": 32 // self.bits}

    def optional(self) -> set[str]:
        return {"g_idx"} if self.g_idx else set()

    def config(self, ignored: list[str]) -> dict[str, Any]:
        # GPTQ has no list of unquantized modules: vLLM skips a module matching a `-:` regex of `dynamic`
        dynamic = {"-:" + re.escape(g).replace(r"\*", ".*"): {} for g in ignored}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": False,
                "sym": True, "lm_head": False, "checkpoint_format": "gptq", **({"dynamic": dynamic} if dynamic else {})}


class Nvfp4(_Method):
    """ModelOpt NVFP4: `weight` uint8 [n, k / 2] (two e2m1 values a byte, low nibble first),
    `weight_scale` fp8 e4m3 [n, k / 16] per 16-block, float32 `weight_scale_2` (global) and
    `input_scale`."""

    scheme: ClassVar[str] = "nvfp4"
    quant_method: ClassVar[str] = "modelopt"
    unit_field: ClassVar[str] = "group_size"
    method: Literal["nvfp4"]
    group_size: Literal[16] = 16
    input_scale: float | None = Field(0.01, gt=0, le=1e6, allow_inf_nan=False)

    def params(self) -> dict[str, int]:
        return {"group": self.group_size}

    def optional(self) -> set[str]:
        return {"input_scale"} if self.input_scale is not None else set()

    def config(self, ignored: list[str]) -> dict[str, Any]:
        # config.json's form (modelopt.py reads `ignore` there; `exclude_modules` only in hf_quant_config.json)
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": self.group_size,
                "ignore": ignored, "producer": {"name": "modelopt"}}


class KvCacheScales(BaseModel):
    """float32 scalar `k_scale` / `v_scale` per attention layer (`{layer}` expanded over every
    layer), for an FP8 KV cache; the weight method's config says so where its loader reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["kv_cache_scales"]
    k_scale: Annotated[OneLine, Field(pattern=r"\{layer\}")] = "model.layers.{layer}.self_attn.k_proj.k_scale"
    v_scale: Annotated[OneLine, Field(pattern=r"\{layer\}")] = "model.layers.{layer}.self_attn.v_proj.v_scale"
    value: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)


QuantizeSpec = Annotated[Union[Fp8Block, Fp8Tensor, Awq, Gptq, Nvfp4, KvCacheScales], Field(discriminator="method")]
BY_SCHEME: dict[str, type[_Method]] = {c.scheme: c for c in (Fp8Block, Fp8Tensor, Awq, Gptq, Nvfp4)}
# the quant_methods whose vLLM config gives attention a KV-cache method (k_scale / v_scale load there)
_KV_CONFIG = {"fp8": {}, "modelopt": {"kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}}}


def tag(cls: type[_Method]) -> str:
    """The `method:` a spec names the class by (its Literal)."""
    return cls.model_fields["method"].annotation.__args__[0]


def loads_kv_scales(method: str | None) -> bool:
    """Whether a checkpoint of this weight method (None: a config_json quantization_config alone)
    can carry kv_cache_scales."""
    return method is None or {tag(c): c for c in BY_SCHEME.values()}[method].quant_method in _KV_CONFIG


def quantization_config(quantize: list, names: Iterable[str] = ()) -> dict[str, Any] | None:
    """The checkpoint's quantization_config; `names` its tensors (what an `ignore` glob is listed as)."""
    weights = [q for q in quantize if not isinstance(q, KvCacheScales)]
    if not weights:
        return None
    config = weights[0].config(weights[0].listed(names))
    if any(isinstance(q, KvCacheScales) for q in quantize):
        config.update(_KV_CONFIG[weights[0].quant_method])
    return config


def spec_problems(quantize: list, config_json: dict, linears: dict[str, tuple[int, int, str]]) -> list[tuple[tuple, str]]:
    """(where, problem) for a `quantize:` list that cannot be written: two weight methods (one
    checkpoint has one quantization_config), KV scales no loader reads, a config_json method of
    another family, and each linear the config implies (`linears`: name -> (n, k, config field))
    that a method selects but its layout cannot hold."""
    out: list[tuple[tuple, str]] = []
    weights = [(i, q) for i, q in enumerate(quantize) if not isinstance(q, KvCacheScales)]
    kv = [i for i, q in enumerate(quantize) if isinstance(q, KvCacheScales)]
    if len(weights) > 1:
        out.append((("quantize", weights[1][0], "method"), "one weight method per checkpoint (one quantization_config)"))
    if len(kv) > 1:
        out.append((("quantize", kv[1], "method"), "kv_cache_scales given twice"))
    given = (config_json.get("quantization_config") or {}).get("quant_method")
    if kv and not weights and not given:
        out.append((("quantize", kv[0], "method"), "kv_cache_scales needs a weight method or a config_json "
                                                     "quantization_config whose vLLM config loads KV-cache scales"))
    if kv and weights and not loads_kv_scales(weights[0][1].method):
        out.append((("quantize", kv[0], "method"), f"vLLM's {weights[0][1].quant_method} config gives attention no "
                                                     f"KV-cache method: its k_scale / v_scale would not load"))
    for i, q in weights:
        allowed = schemes()[q.scheme]["methods"]
        if given and given not in allowed:
            out.append((("config_json", "quantization_config", "quant_method"),
                        f"{given!r} is not a {q.method} checkpoint's method ({', '.join(allowed)})"))
        for name, (n, k, field) in linears.items():
            bad = q.misaligned(n, k) if q.selects(name) else None
            if bad:
                out.append((("quantize", i, q.unit_field), f"{name} [{n}, {k}] (config {field}): {bad}"))
                break
    return out
