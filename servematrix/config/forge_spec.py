"""What a forge spec may ask for: the ForgeSpec model and its parts, and the size estimate that
bounds them.

Separate from forge.py, which writes checkpoints, because a scenario file's `model.forge` is
validated (and its cache key computed) wherever scenarios are loaded; that needs the limits and
the estimate, never torch or transformers. The `quantize:` methods (layouts, configs) are quantize.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, model_validator

from servematrix.config.quantize import QuantizeSpec, spec_problems
from servematrix.config.fields import OneLine
from servematrix.config.yamlio import field_error

# Bump when the forge's output changes for the same spec, so stale cache entries are not reused.
FORGE_VERSION = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The forge builds the whole model in memory in its dtype, re-draws every weight and writes it:
# peak memory is about three times the weights. 250M parameters is 1 GB of float32 weights, ~3 GB
# at peak: far above every checkpoint forged here (1M-8M) and within what a CI host has. The
# estimate (model_params) errs high: a spec it lets through cannot ask for more.
MAX_FORGE_PARAMS = 250_000_000
MAX_TENSOR_DIM = 1 << 20  # one dimension of an extra, reshaped or added tensor
ASSUMED_FFN = 32_768  # an FFN width the config leaves to the family default: above every default known

# The config fields the estimate reads, by role: names across transformers families, and the range
# a real model's value lies in (a whole number: `1e9` is a string in YAML, `true` is no size).
# An FFN width of 0 is a published value: "no such FFN" (MiniMax-M2's shared_intermediate_size: 0,
# no shared expert); it adds no parameters, so the estimate needs no other bound for it.
_ROLES: dict[str, tuple[tuple[str, ...], int, int]] = {
    "width": (("hidden_size", "n_embd", "d_model", "dim"), 1, 65_536),
    "layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 1, 1_024),
    "ffn": (("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size", "ffn_dim",
             "n_inner", "d_ff", "ffn_hidden_size"), 0, 262_144),
    "heads": (("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "n_heads",
               "index_n_heads"), 1, 1_024),
    "head_dim": (("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "index_head_dim",
                  "rotary_dim", "kv_channels", "d_kv"), 1, 4_096),
    "rank": (("q_lora_rank", "kv_lora_rank"), 1, 65_536),
    "experts": (("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"), 0, 4_096),
    "shared": (("n_shared_experts", "num_shared_experts"), 0, 256),
    "vocab": (("vocab_size",), 1, 1 << 20),
    "positions": (("max_position_embeddings", "n_positions", "n_ctx"), 1, 1 << 24),
    "image": (("image_size",), 1, 16_384),
    "patch": (("patch_size",), 1, 16_384),
}
_ROLE_OF = {name: role for role, (names, _, _) in _ROLES.items() for name in names}
# Any other field named like a size (num_*, n_*, *_size, *_dim, ...) that holds an integer is
# capped too: the estimate does not read it, so it must not be able to grow a tensor unseen.
_SIZE_LIKE = re.compile(r"^(num|n)_|_(size|dim|dims|rank|heads|layers|experts|channels|group|groups|tok|tokens)$")
MAX_OTHER_SIZE = 1 << 20


def _size_field_error(config: dict[str, Any]) -> tuple[str, str] | None:
    """(field, problem) for the first size field out of its range, or None."""
    for key, value in config.items():
        if key in _ROLE_OF:
            _, lo, hi = _ROLES[_ROLE_OF[key]]
            optional = _ROLE_OF[key] not in ("width", "layers")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                return key, f"must be a whole number in {lo}..{hi} (got {value!r:.40})"
        elif _SIZE_LIKE.search(key) and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_OTHER_SIZE:
                return key, f"must be in 0..{MAX_OTHER_SIZE} (got {value})"
    return None


def _missing_field_error(config: dict[str, Any]) -> str | None:
    """A size the estimate needs that the config leaves to the family default (full-size)."""
    for role in ("width", "layers"):
        if not any(config.get(n) is not None for n in _ROLES[role][0]):
            return (f"set {' or '.join(_ROLES[role][0][:2])}: the family's default is a full-size model "
                    f"(the forge refuses more than {MAX_FORGE_PARAMS} parameters)")
    # an expert count of 0 is given (a dense model of a MoE family: granite-4.0-h-1b's num_local_experts 0);
    # an expert field stated as null says no MoE block (Gemma 4's dense sizes: num_experts null)
    moe = any(("expert" in k or "moe" in k) and v is not None for k, v in config.items())
    if moe and not any(config.get(n) is not None for n in _ROLES["experts"][0]):
        return (f"set the expert count ({' / '.join(_ROLES['experts'][0])}): a mixture-of-experts family's "
                "default is a full-size model")
    return None


def _role(config: dict[str, Any], role: str, default: int = 0) -> int:
    values = [config[n] for n in _ROLES[role][0] if isinstance(config.get(n), int)]
    return max(values) if values else default


def model_params(config: dict[str, Any], vocab: int = 0) -> int:
    """A generous estimate of the parameters of one transformers model with this config (sizes
    already checked): embeddings (input, output, positions, image patches) plus per layer every
    attention matrix at the widest width any of its fields gives and a gated FFN per expert."""
    h, layers = _role(config, "width", 1), _role(config, "layers", 1)
    heads, head_dim = _role(config, "heads", 1), _role(config, "head_dim", 0) or max(h // _role(config, "heads", 1), 1)
    ranks = [config.get(n) or 0 for n in _ROLES["rank"][0]]
    widest = max(h, heads * head_dim, heads * sum(config.get(n) or 0 for n in ("qk_rope_head_dim", "qk_nope_head_dim")),
                 (config.get("index_n_heads") or 0) * (config.get("index_head_dim") or 0), *ranks)
    # q, k, v, o and the low-rank / indexer projections: each maps the hidden size or a low rank
    # onto at most the widest head width (none maps a head width onto another), so each is at most
    # widest x max(hidden, ranks); widest² would refuse MLA twins of a few million values at TP=8
    attention = 8 * widest * max(h, *ranks)
    ffn = _role(config, "ffn", max(ASSUMED_FFN, 4 * h))
    experts = _role(config, "experts") + _role(config, "shared")
    mlp = 3 * h * ffn * (1 + experts) + h * experts  # gate, up, down per expert, and the router
    vocab = max(vocab, _role(config, "vocab"))
    patches = (_role(config, "image") // _role(config, "patch", 1)) ** 2 if "image_size" in config else 0
    embeddings = 2 * vocab * h + (_role(config, "positions") + patches) * h + 3 * _role(config, "patch") ** 2 * h
    return embeddings + layers * (attention + mlp + 4 * h)


def _numel(shape: list[int] | None) -> int:
    return math.prod(shape or [1])


# transformers' model_type: also the name of the configuration module the forge may ship. Some are
# spelled with hyphens (xlm-roberta, gpt-sw3): allowed between segments, never a path separator or dot
ModelType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*$", max_length=64)]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
TensorName = Annotated[OneLine, StringConstraints(min_length=1)]
Shape = Annotated[list[Annotated[int, Field(strict=True, ge=1, le=MAX_TENSOR_DIM)]], Field(max_length=8)]
# A JSON object: what config.json holds and the spec's hash is computed over (no dates or sets).
JsonObject = dict[str, JsonValue]


class TokenizerSpec(_Strict):
    vocab_size: int = Field(1024, strict=True, ge=300, le=65536)
    chat_template: bool = True


class Mutation(_Strict):
    """One deliberate defect written into the checkpoint after it is forged."""

    op: Literal["rename", "drop", "reshape", "add"]
    tensor: TensorName
    to: TensorName | None = None  # rename target
    shape: Shape | None = None  # reshape/add shape


class ExtraTensor(_Strict):
    """A tensor the real checkpoint carries that transformers' class does not write (FP8 KV-cache
    scales, a remote-code module, a buffer older transformers saved); `{layer}` is expanded over
    every layer. `random`: drawn like the forged weights instead of filled with `value`; `arange`:
    0..n-1 along the last dim (an index buffer: BERT's int64 `embeddings.position_ids`, which
    transformers 5 no longer writes; a loader that copies it must get valid positions)."""

    name: TensorName
    shape: Shape = Field(default_factory=list)  # [] = a scalar
    value: float = Field(1.0, strict=True, allow_inf_nan=False)
    random: bool = False
    arange: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "int64"] = "float32"

    @model_validator(mode="after")
    def _one_fill(self) -> "ExtraTensor":
        if self.arange and (self.random or not self.shape) or self.dtype == "int64" and not self.arange:
            raise field_error(("arange",), "arange (an index buffer, the only int64 extra) needs a shape, not random")
        return self


def _check_config(config: dict[str, Any], at: tuple = ("config",)) -> None:
    """A config the forge hands to a transformers class: every size in range, none left to the
    family's full-size default."""
    bad = _size_field_error(config)
    if bad is not None:
        raise field_error(at + (bad[0],), bad[1])
    missing = _missing_field_error(config)
    if missing is not None:
        raise field_error(at, missing)


class Component(_Strict):
    """One transformers model inside a composite checkpoint (a multimodal model's vision tower),
    written by its own class under `prefix`; its config goes into the top config at `config_key`."""

    model_type: ModelType  # e.g. "siglip_vision_model"
    config: JsonObject = Field(default_factory=dict)
    prefix: OneLine  # e.g. "vpm."
    strip: OneLine = ""  # leading part of the class's own tensor names to drop (e.g. "vision_model.")
    config_key: Identifier  # e.g. "vision_config"

    @model_validator(mode="after")
    def _sizes(self) -> "Component":
        _check_config(self.config)
        return self


class Fp8Blocks(_Strict):
    """Store matching weights as FP8 (e4m3) with one float32 scale per block beside them, named
    `<name>_scale_inv` (DeepSeek's FP8 layout: the dequantized weight is fp8 × scale_inv)."""

    tensors: TensorName  # glob over tensor names, e.g. "model.layers.*.self_attn.indexer.wk.weight"
    block: list[Annotated[int, Field(strict=True, ge=1, le=4096)]] = Field(
        default_factory=lambda: [128, 128], min_length=2, max_length=2)


class ForgeSpec(_Strict):
    model_type: ModelType  # transformers' model_type, e.g. "llama"
    architecture: Identifier  # e.g. "LlamaForCausalLM"
    config: JsonObject = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, strict=True, ge=0, le=2**32 - 1)
    # A large init makes the random model's logits peaked, so greedy decoding is decisive and
    # parity between TP layouts is meaningful instead of a coin toss between near-ties.
    init_std: float = Field(0.3, strict=True, gt=0, le=10, allow_inf_nan=False)
    tokenizer: TokenizerSpec = TokenizerSpec()
    extra_tensors: list[ExtraTensor] = Field(default_factory=list)
    fp8_blocks: list[Fp8Blocks] = Field(default_factory=list)
    # AWQ / GPTQ / NVFP4 / FP8 layouts really quantized from the forged weights, KV-cache scales, and
    # the quantization_config they imply (config/quantize.py; config_json's, if any, wins)
    quantize: list[QuantizeSpec] = Field(default_factory=list, max_length=4)
    # composite checkpoints (model_type only the remote code knows, e.g. minicpmv): the text model
    # is `text_model_type` written under `text_prefix`, the components beside it
    text_model_type: ModelType | None = None
    text_prefix: OneLine = ""
    # where the text model's config goes in config.json: None, at the top beside the components
    # (MiniCPM-V's); a key, nested under it as its own config with its causal-LM architecture (Llava's
    # text_config, which vLLM builds the language model from)
    text_config_key: Identifier | None = None
    components: list[Component] = Field(default_factory=list)
    config_json: JsonObject = Field(default_factory=dict)  # merged into config.json after saving
    remote_code: bool = False  # ship configuration_<model_type>.py + auto_map (--trust-remote-code)
    mutations: list[Mutation] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits_the_forge(self) -> "ForgeSpec":
        _check_config(self.config)
        # config_json reaches config.json after the forge: vLLM builds what it says, so its sizes
        # count too, at the larger of the two values
        bad = _size_field_error(self.config_json)
        if bad is not None:
            raise field_error(("config_json", bad[0]), bad[1])
        problems = spec_problems(self.quantize, self.config_json, _llama_linears(self.config, self.text_prefix))
        if problems:
            raise field_error(*problems[0])
        parts = self._parts()
        total = sum(n for _, n in parts)
        if total > MAX_FORGE_PARAMS:
            at, _ = max(parts, key=lambda p: p[1])
            raise field_error(at, f"the forged model would have about {total:,} parameters (a generous estimate "
                                  f"from its sizes), more than the forge's limit of {MAX_FORGE_PARAMS:,}; "
                                  "make it smaller")
        return self

    def _parts(self) -> list[tuple[tuple, int]]:
        """(where, estimated parameters) of everything the forge allocates; `where` points at the
        field that contributes most to that part."""
        larger = {k: v for k, v in self.config_json.items()
                  if k in _ROLE_OF and isinstance(v, int) and v > _role({k: self.config.get(k)}, _ROLE_OF[k])}
        text, vocab = {**self.config, **larger}, self.tokenizer.vocab_size
        biggest = _biggest(text, vocab)
        parts = [(("config_json" if biggest in larger else "config", biggest), model_params(text, vocab))]
        parts += [(("components", i, "config", _biggest(c.config)), model_params(c.config))
                  for i, c in enumerate(self.components)]
        layers = _role(text, "layers", 1)
        parts += [(("extra_tensors", i, "shape"), _numel(t.shape) * (layers if "{layer}" in t.name else 1))
                  for i, t in enumerate(self.extra_tensors)]
        parts += [(("mutations", i, "shape"), _numel(m.shape)) for i, m in enumerate(self.mutations)]
        return parts

    def key(self) -> str:
        dump = self.model_dump()
        if not dump["quantize"]:  # specs from before `quantize:` (and extras' `arange`) keep their cache keys
            dump.pop("quantize")
        if dump["text_config_key"] is None:  # and those from before `text_config_key:`
            dump.pop("text_config_key")
        dump["extra_tensors"] = [{k: v for k, v in e.items() if k != "arange" or v} for e in dump["extra_tensors"]]
        blob = json.dumps({"v": FORGE_VERSION, **dump}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _biggest(config: dict[str, Any], vocab: int = 0) -> str:
    """The size field whose value adds most to the estimate: the one to name when it is too big."""
    present = [k for k in config if k in _ROLE_OF and isinstance(config[k], int)]
    if not present:
        return next(iter(_ROLES["width"][0]))
    full = model_params(config, vocab)
    return max(present, key=lambda k: full - model_params({**config, k: _ROLES[_ROLE_OF[k]][1] or 1}, vocab))


def _llama_linears(config: dict[str, Any], prefix: str) -> dict[str, tuple[int, int, str]]:
    """The linears of a Llama-family decoder layer the config implies (name -> out, in, the config
    field that sets their width), for checking a quantize spec's alignment at validation; other
    families' linears are checked by the forge, which sees their shapes."""
    h, ffn = config.get("hidden_size"), config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (h, ffn, heads)):
        return {}
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    p = f"{prefix}model.layers.0."
    return {p + "self_attn.q_proj.weight": (heads * hd, h, "num_attention_heads"),
            p + "self_attn.k_proj.weight": (kv * hd, h, "num_key_value_heads"),
            p + "self_attn.v_proj.weight": (kv * hd, h, "num_key_value_heads"),
            p + "self_attn.o_proj.weight": (h, heads * hd, "hidden_size"),
            p + "mlp.gate_proj.weight": (ffn, h, "intermediate_size"),
            p + "mlp.up_proj.weight": (ffn, h, "intermediate_size"),
            p + "mlp.down_proj.weight": (h, ffn, "intermediate_size")}
