"""Every file `servematrix mirror` reads, typed at the boundary: config.json as read, a
safetensors header, an index weight map, mirror.json (and the small side files: tokenizer_config
.json, hf_quant_config.json). One reader (`read_json`) and one pydantic model per kind; whatever a
file holds that its model refuses is one ConfigError naming the file, the line where the field
stands and the field, what it got and what would be accepted. Nothing past this module sees an
untyped value of these fields, so the plan cannot crash or hang on one (a 10^12-layer config is
refused here with the accepted range, not looped over later).

Separate from source.py, which decides where a source's files are and what layout they make."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from typing_extensions import TypedDict

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError,
                      create_model)

from servematrix.errors import ConfigError, StateError
from servematrix.mirror.layout import MirrorOrigin, TensorMeta, rules

JSON_MAX_BYTES = 64 * 2**20  # a 100k-tensor index map is ~10 MB; no metadata file of a real checkpoint nears this
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own bound (safetensors refuses larger headers)
# the dtype codes of the safetensors format (safetensors' Dtype enum)
SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
                      "F32", "F64", "I64", "U64", "F4", "F6_E2M3", "F6_E3M2", "C64")
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
              "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4}

# The ranges of the config fields the plan reads as counts and widths (mirror-families.yaml names
# the spellings per role). Each is far above any published checkpoint (the largest have ~130
# layers, 512 experts, hidden 16-32k, vocab 262k, 10M positions) and low enough that what the
# plan does per layer / expert / width stays bounded in time: a config-only source builds the full
# layout on the meta device, ~10 ms a decoder layer here (1024 layers: ~10 s), and its
# layers x experts is bounded too (MODULES_MAX; the largest published MoE have ~25k).
LAYERS_MAX = 1024
MODULES_MAX = 65536
WIDTH_MAX = 2**20
COUNT_MAX = 65536
ROLE_RANGES: dict[str, tuple[int, int]] = {
    "layers": (1, LAYERS_MAX), "hidden": (1, WIDTH_MAX), "heads": (1, COUNT_MAX), "kv_heads": (1, COUNT_MAX),
    "head_dim": (1, COUNT_MAX), "ffn": (0, 2**24), "experts": (0, COUNT_MAX), "top_k": (0, COUNT_MAX),
    "n_group": (0, COUNT_MAX), "topk_group": (0, COUNT_MAX), "shared_experts": (0, COUNT_MAX),
    "first_dense": (0, LAYERS_MAX), "mtp": (0, 64), "q_lora": (0, WIDTH_MAX), "mla": (0, WIDTH_MAX),
    "dsa": (0, 2**24), "kept": (0, WIDTH_MAX), "index_heads": (0, COUNT_MAX), "positions": (1, 2**31 - 1),
    "scaled_with_head_dim": (0, COUNT_MAX)}
VOCAB_RANGE = (1, 2**24)
PER_LAYER_ROLES = ("ffn",)  # roles a config may state per layer, as a list
MODEL_TYPE_RE = r"^[A-Za-z0-9_.\-]{1,100}$"
TENSOR_NAME_MAX = 1000  # characters; real names are under 200 (a spec's names are one line of text too)
# Unicode's control characters (Cc) and line/paragraph separators: a regex, as a 100k-tensor header
# has millions of name characters
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _int(lo: int, hi: int) -> Any:
    return Annotated[StrictInt, Field(ge=lo, le=hi)]


# ---- one reader ----

def read_json(path: Path, what: str = "", infinity: bool = False) -> Any:
    """The JSON value of `path`: bounded in size, strict UTF-8, no NaN (nor Infinity unless
    `infinity`), no number longer than Python converts, nesting bounded; any of these is a
    ConfigError at its line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise StateError(path, f"is not a regular file{' (' + what + ')' if what else ''}")
        size = path.stat().st_size
        if size > JSON_MAX_BYTES:
            raise ConfigError(path, None, None, f"{size:,} bytes: larger than any {what or 'metadata file'} "
                                                f"(limit {JSON_MAX_BYTES:,})")
        raw = path.read_bytes()
    except OSError as exc:
        raise StateError(path, f"cannot read: {exc.strerror or exc}") from None
    return loads(raw, path, infinity)


def loads(raw: bytes, path: Path | str, infinity: bool = False) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, None, f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None

    def no_constant(name: str):
        if infinity and name in ("Infinity", "-Infinity"):
            return float(name.replace("Infinity", "inf"))
        raise ValueError(f"{name} is not a JSON number (accepted: finite numbers"
                         f"{', Infinity and -Infinity' if infinity else ''})")

    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, exc.lineno, None, f"not JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(path, None, None, "not JSON this reader takes: nested too deep") from None
    except ValueError as exc:  # NaN/Infinity, or an integer of more digits than Python converts
        raise ConfigError(path, _line_of_error(text, exc), None, f"not JSON this reader takes: {_short(str(exc))}") from None


def _line_of_error(text: str, exc: ValueError) -> int | None:
    m = re.search(r"(NaN|-?Infinity)", str(exc))
    if m:
        at = text.find(m.group(1))
        return text.count("\n", 0, at) + 1 if at >= 0 else None
    m = re.search(r"\d{4301,}", text)  # the conversion limit (sys.get_int_max_str_digits)
    return text.count("\n", 0, m.start()) + 1 if m else None


def line_of(text: str | None, key: str) -> int | None:
    """The line where `"key":` first stands in a JSON text: the field's place for the error."""
    if not text:
        return None
    at = text.find(json.dumps(key) + ":")
    if at < 0:
        at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else None


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _got(value: Any) -> str:
    return _short(repr(value) if not isinstance(value, (dict, list)) else json.dumps(value)[:200], 80)


_TAG = re.compile(r"^(constrained-\w+|(list|dict|tuple|set)\[.*\]|str|int|bool|none|float|function-\w+|\w+Json)$")


def _first_error(exc: ValidationError) -> tuple[list, Any, str]:
    """(the field's path without pydantic's union-member tags, the value, pydantic's message)."""
    e = exc.errors(include_url=False)[0]
    parts = [p for p in e["loc"] if not (isinstance(p, str) and _TAG.match(p))]
    return parts, ("<missing>" if e["type"] == "missing" else e.get("input")), e["msg"]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.stat().st_size <= JSON_MAX_BYTES else None
    except (OSError, UnicodeDecodeError):
        return None


def _refuse(path: Path | str, exc: ValidationError, accepted: dict[str, str], prefix: str = "",
            text: str | None = None) -> ConfigError:
    """The first field a model refused, as one located line: file:line: field: got X; accepted: Y
    (Y the field's own description where it is a top-level field or an element of one)."""
    parts, value, msg = _first_error(exc)
    if text is None and isinstance(path, Path):
        text = _text(path)
    if not parts:  # the file (or the object) itself is of another type
        return ConfigError(path, None, prefix.rstrip(".") or None, f"not a JSON object (got {_got(value)})")
    field = ".".join(str(p) for p in parts)
    # the line of the innermost key the text has (a missing key: the object that lacks it)
    line = next((n for p in reversed(parts) if isinstance(p, str) and (n := line_of(text, p))), None)
    want = accepted.get(str(parts[0]))
    if want and len(parts) > 1 and not isinstance(parts[1], int):  # inside an object: pydantic's word, and the whole
        want = f"{msg[:1].lower()}{msg[1:]} ({want})"
    return ConfigError(path, line, prefix + field,
                       f"{'missing' if value == '<missing>' else 'got ' + _got(value)}; accepted: {want or msg}")


# ---- config.json ----

class _ConfigBase(BaseModel):
    # a config carries any number of fields the mirror does not read: they pass through as they are
    model_config = ConfigDict(extra="allow", protected_namespaces=(), frozen=True)


class QuantizationConfig(_ConfigBase):
    """The fields of a quantization_config (or hf_quant_config.json's) that layout.parse_quant reads."""

    quant_method: StrictStr | None = None
    quant_algo: StrictStr | None = None
    format: StrictStr | None = None
    bits: _int(1, 64) | None = None
    w_bit: _int(1, 64) | None = None
    group_size: _int(-1, 2**20) | None = None  # GPTQ's -1: one group per channel
    q_group_size: _int(-1, 2**20) | None = None
    weight_block_size: Annotated[list[_int(1, 2**20)], Field(min_length=1, max_length=2)] | None = None
    activation_scheme: StrictStr | None = None
    config_groups: dict[StrictStr, Any] | None = None


def _quant_fields() -> dict[str, Any]:
    # the module lists (ignored_layers, modules_to_not_convert, ...) and the KV-cache keys
    q = rules()["quant_config"]
    fields: dict[str, Any] = {k: (list[StrictStr] | None, None) for k in q["ignored_keys"]}
    fields.update({k: (StrictStr | dict[StrictStr, Any] | None, None) for k in q["kv_cache_keys"]})
    return fields


@lru_cache(maxsize=1)
def quant_model() -> type[BaseModel]:
    return create_model("QuantizationConfigJson", __base__=QuantizationConfig, **_quant_fields())


@lru_cache(maxsize=1)
def config_model() -> type[BaseModel]:
    """config.json as read: the fields the mirror itself reads typed (model_type, architectures,
    auto_map, quantization_config, tie_word_embeddings, vocab_size), and every spelling of every
    role in mirror-families.yaml's `fields` that is a count or width: a whole number in its
    range, or null."""
    fields: dict[str, Any] = {
        "model_type": (Annotated[StrictStr, Field(pattern=MODEL_TYPE_RE)], ...),
        "architectures": (list[StrictStr] | None, None),
        "auto_map": (dict[StrictStr, StrictStr | list[StrictStr | None]] | None, None),
        "quantization_config": (quant_model() | None, None),
        "tie_word_embeddings": (StrictBool | None, None),
        "vocab_size": (_int(*VOCAB_RANGE) | None, None),
    }
    for role, keys in rules()["fields"].items():
        if role in ROLE_RANGES:
            lo, hi = ROLE_RANGES[role]
            # one number each: the plan (dims.py, layout.Structure) reads every role as a scalar;
            # a per-layer list (Hunyuan's moe_topk) is refused here by name, not met by a crash there.
            # Feed-forward widths may be one per layer (Gemma 3n): dims.py shrinks each alike
            kind = _int(lo, hi) | list[_int(lo, hi)] if role in PER_LAYER_ROLES else _int(lo, hi)
            for key in (k for k in keys if "." not in k):  # a sub-config's field is read inside its object
                fields.setdefault(key, (kind | None, None))
    for key in rules()["fields"]["layer_index_lists"]:
        fields.setdefault(key, (list[_int(0, LAYERS_MAX)] | None, None))
    return create_model("ConfigJson", __base__=_ConfigBase, **fields)


@lru_cache(maxsize=1)
def config_accepted() -> dict[str, str]:
    out = {"model_type": "a transformers model_type name (letters, digits, _ . -)",
           "architectures": "a list of class names", "auto_map": "an object of class paths",
           "quantization_config": "an object (quant_method, bits, group_size, weight_block_size, ...)",
           "tie_word_embeddings": "true, false or null",
           "vocab_size": f"a whole number in {VOCAB_RANGE[0]}..{VOCAB_RANGE[1]} or null"}
    for role, keys in rules()["fields"].items():
        if role in ROLE_RANGES:
            lo, hi = ROLE_RANGES[role]
            rng = f"a whole number in {lo}..{hi}" + (" (or a list of them, one per layer)" if role in PER_LAYER_ROLES else "")
            for key in (k for k in keys if "." not in k):
                out.setdefault(key, rng + " or null")
    for key in rules()["fields"]["layer_index_lists"]:
        out.setdefault(key, f"a list of layer indices in 0..{LAYERS_MAX}, or null")
    return out


def validate_config(data: Any, path: Path | str, text: str | None = None) -> dict[str, Any]:
    """config.json's object, typed: returned as the dict it was (the plan reads it as JSON)."""
    if not isinstance(data, dict):
        raise ConfigError(path, None, None, f"not a JSON object (got {type(data).__name__}): a config.json is one")
    if "model_type" not in data:
        raise ConfigError(path, None, "model_type", "missing: a config.json names its model_type")
    try:
        config_model().model_validate(data)
    except ValidationError as exc:
        raise _refuse(path, exc, config_accepted(), text=text) from None
    return data


def read_config(path: Path) -> dict[str, Any]:
    # Infinity is a value published configs carry (Mamba-Codestral-7B's time_step_limit
    # [0.0, Infinity], as transformers' json.dumps writes float("inf")); NaN is not
    return validate_config(read_json(path, "config.json", infinity=True), path)


# ---- safetensors headers ----

class _Entry(TypedDict):
    # a TypedDict, not a model: 100k entries validate in ~1 s, where 100k model instances took ~4 s
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]

    dtype: Literal[SAFETENSORS_DTYPES]  # the format's own codes: any other makes the header corrupt
    shape: Annotated[list[_int(0, 2**40)], Field(max_length=16)]
    data_offsets: tuple[_int(0, 2**62), _int(0, 2**62)]


_HEADER = TypeAdapter(dict[str, _Entry])
_ENTRY_ACCEPTED = {"dtype": "a safetensors dtype code: " + ", ".join(SAFETENSORS_DTYPES),
                   "shape": "a list of at most 16 whole numbers >= 0",
                   "data_offsets": "[start, end], whole numbers with start <= end"}


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor dtypes and shapes from a safetensors file's header alone: reads 8 + N bytes, so a
    file truncated right after its header (a metadata-only copy) reads the same as the full one."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StateError(path, f"not a safetensors file: {len(head)} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER or n > size - 8:
                raise StateError(path, f"corrupt safetensors header: its length field says {n} bytes but the file "
                                       f"holds {size - 8} after it (limit {SAFETENSORS_MAX_HEADER})")
            raw = f.read(n)
    except OSError as exc:
        raise StateError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = loads(raw, path)
    except ConfigError as exc:
        raise StateError(path, f"corrupt safetensors header: {exc.message}") from None
    if not isinstance(header, dict):
        raise StateError(path, "corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)  # free-form strings; the mirror reads none of them
    try:
        entries = _HEADER.validate_python(header)
    except ValidationError as exc:
        parts, value, _ = _first_error(exc)
        name = parts[0] if parts else "?"
        part = str(parts[1]) if len(parts) > 1 else None
        entry = header.get(name)
        if part and isinstance(entry, dict):  # the field as the header has it, not one element of it
            value = entry.get(part, "<missing>")
        said = "missing" if value == "<missing>" else f"got {_got(value)}"
        want = _ENTRY_ACCEPTED.get(part, "an object {dtype, shape, data_offsets}")
        raise StateError(path, f"corrupt safetensors header: tensor {name!r}"
                               f"{' ' + part if part else ''}: {said}; accepted: {want}") from None
    out: dict[str, TensorMeta] = {}
    for name, e in entries.items():
        if (why := _bad_tensor_name(name)) is not None:
            raise StateError(path, f"corrupt safetensors header: tensor name {name!r}: {why}")
        start, end = e["data_offsets"]
        dtype, shape = e["dtype"], e["shape"]
        bits = DTYPE_BITS.get(dtype)
        if end < start or (bits is not None and (end - start) * 8 != math.prod(shape) * bits):
            raise StateError(path, f"corrupt safetensors header: tensor {name!r} {dtype}{list(shape)} spans "
                                   f"{end - start} bytes")
        out[name] = TensorMeta.model_construct(dtype=dtype, shape=tuple(shape))  # validated just above
    return out


def _bad_tensor_name(name: str) -> str | None:
    """Why `name` is no tensor name a checkpoint holds (it would become a scenario's extra tensor,
    a printed line and a dict key of the twin), or None: one line of text, as a spec's names are."""
    if not name or len(name) > TENSOR_NAME_MAX:
        return f"accepted: 1 to {TENSOR_NAME_MAX} characters"
    bad = _LINE_BREAKING.search(name)
    return None if bad is None else f"holds the control character U+{ord(bad[0]):04X}; accepted: one line of text"


# ---- index weight map ----

def _shard_name(name: str) -> str:
    # a shard is a file beside the index: never an absolute path or one that climbs out of it
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or "\x00" in name or "\\" in name:
        raise ValueError("a file name beside the index")
    return name


ShardName = Annotated[StrictStr, Field(min_length=1, max_length=255)]


class IndexJson(BaseModel):
    """model.safetensors.index.json: tensor name -> the shard file (beside the index) that holds it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    weight_map: dict[StrictStr, ShardName]
    metadata: dict[StrictStr, Any] | None = None


def read_index(path: Path) -> IndexJson:
    data = read_json(path, "safetensors index")
    if not isinstance(data, dict):
        raise ConfigError(path, None, None, f"not a JSON object (got {type(data).__name__}): an index holds weight_map")
    try:
        index = IndexJson.model_validate(data)
    except ValidationError as exc:
        raise _refuse(path, exc, {"weight_map": "an object of tensor name -> shard file name",
                                  "metadata": "an object"}) from None
    for tensor, shard in index.weight_map.items():
        if (why := _bad_tensor_name(tensor)) is not None:
            raise ConfigError(path, line_of(_text(path), tensor), "weight_map", f"tensor name {tensor!r}: {why}")
        try:
            _shard_name(shard)
        except ValueError as exc:
            raise ConfigError(path, line_of(_text(path), tensor), f"weight_map.{tensor}",
                              f"got {_got(shard)}; accepted: {exc}") from None
    return index


# ---- mirror.json and the side files ----

class _NotMirrored(TypedDict):
    what: StrictStr
    reason: StrictStr


class _MirrorJson(MirrorOrigin):
    # stricter than the layout's MirrorOrigin where diff.py reads more than its type says: each
    # not_mirrored entry's `what` and `reason` (an entry {} was a KeyError in --diff)
    not_mirrored: list[_NotMirrored] = Field(default_factory=list)


def read_origin(path: Path) -> MirrorOrigin:
    data = read_json(path, "mirror.json")
    try:
        _MirrorJson.model_validate(data)
        return MirrorOrigin.model_validate(data)
    except ValidationError as exc:
        raise _refuse(path, exc, {"source": "the source a twin was mirrored from (a string)",
                                  "layer_map": "an object of source layer -> twin layer (whole numbers)",
                                  "experts": "a whole number or null",
                                  "not_mirrored": "a list of {\"what\": text, \"reason\": text}",
                                  "post_processed": "a list of strings"}) from None


class TokenizerConfigJson(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    tokenizer_class: StrictStr | None = None
    chat_template: StrictStr | list[Any] | None = None


def read_tokenizer_config(path: Path) -> TokenizerConfigJson:
    data = read_json(path, "tokenizer_config.json")
    try:
        return TokenizerConfigJson.model_validate(data)
    except ValidationError as exc:
        raise _refuse(path, exc, {"tokenizer_class": "a class name or null",
                                  "chat_template": "a Jinja template, a list of named templates, or null"}) from None


def read_hf_quant(path: Path) -> dict[str, Any]:
    """ModelOpt's hf_quant_config.json: its `quantization` object (or the file itself) is a
    quantization_config."""
    data = read_json(path, "hf_quant_config.json")
    if not isinstance(data, dict):
        raise ConfigError(path, None, None, f"not a JSON object (got {type(data).__name__})")
    inner = data.get("quantization", data)
    try:
        quant_model().model_validate(inner)
    except ValidationError as exc:
        prefix = "quantization." if "quantization" in data else ""
        raise _refuse(path, exc, {}, prefix) from None
    return data
