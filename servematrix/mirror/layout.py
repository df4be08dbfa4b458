"""The typed layout of a checkpoint, as servematrix mirror reads it from metadata alone: tensor
names with dtype and shape, the quantization layout (the config's quantization_config parsed,
beside what the tensors themselves show), and the structure the plan shrinks (MoE, MLA, DSA, MTP
layers, first-dense layers, tied embeddings). Everything that varies per family comes from
servematrix/data/mirror-families.yaml."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config import mirror_families, packaged
from servematrix.errors import ConfigError

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
HF_QUANT_FILE = "hf_quant_config.json"
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorMeta(_Model):
    dtype: str  # the safetensors code: BF16, F8_E4M3, I32, U8, ...
    shape: tuple[int, ...]


class TokenizerInfo(_Model):
    files: list[str] = Field(default_factory=list)
    tokenizer_class: str | None = None
    chat_template: bool = False


class QuantLayout(_Model):
    """The quantization_config, parsed, beside what the tensors themselves show."""

    method: str | None = None  # quant_method as the config says (fp8, awq, gptq, modelopt, compressed-tensors)
    algo: str | None = None  # modelopt's quant_algo / compressed-tensors' format
    schemes: dict[str, int] = Field(default_factory=dict)  # scheme (mirror-families.yaml) -> quantized weights
    bits: int | None = None
    group_size: int | None = None
    weight_block_size: list[int] | None = None
    activation_scheme: str | None = None
    kv_cache: str | None = None  # the KV-cache quantization the config asks for
    kv_scales: int = 0  # k_scale / v_scale-like tensors
    ignored_key: str | None = None
    ignored: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)  # the raw quantization_config
    config_file: str | None = None  # config.json or hf_quant_config.json

    @property
    def pack(self) -> int | None:
        return 32 // self.bits if self.bits else None


class Structure(_Model):
    num_layers: int  # main decoder layers (num_hidden_layers)
    layer_stem: str | None  # the names' part before the index: "model.layers." / "encoder.layer."
    moe: bool
    experts: int | None
    top_k: int | None
    shared_experts: int | None
    n_group: int | None
    topk_group: int | None
    first_dense: int | None
    mla: bool
    dsa: bool
    indexer_tensors: list[str] = Field(default_factory=list)  # per-layer leaves under .indexer.
    mtp_layers: int = 0  # the config's count
    mtp_layer_indices: list[int] = Field(default_factory=list)  # tensor layer indices past num_layers
    tied_embeddings: bool
    lm_head: bool  # lm_head.weight is a tensor of its own


class MirrorOrigin(_Model):
    """What mirror.json of a twin says about where it came from (diff reads the layer map from it)."""

    source: str
    layer_map: dict[int, int]
    experts: int | None = None
    not_mirrored: list[dict[str, str]] = Field(default_factory=list)
    post_processed: list[str] = Field(default_factory=list)


class SourceLayout(_Model):
    source: str
    kind: Literal["local", "hf", "model_type"]
    model_type: str
    architectures: list[str]
    config: dict[str, Any]
    auto_map: dict[str, Any] = Field(default_factory=dict)
    tensors: dict[str, TensorMeta]
    files: list[str] = Field(default_factory=list)  # safetensors files whose headers were read
    tokenizer: TokenizerInfo = TokenizerInfo()
    quant: QuantLayout
    structure: Structure
    origin: MirrorOrigin | None = None


# ---- rules (servematrix/data/mirror-families.yaml) ----

@lru_cache(maxsize=1)
def rules() -> dict[str, Any]:
    return packaged.load_raw(mirror_families.FILE, mirror_families.MirrorFamilies)


@lru_cache(maxsize=1)
def layer_re() -> re.Pattern:
    """`<stem><container>.<i>.` at a name's start: group 1 the stem with its container (the
    `layer_containers` of mirror-families.yaml, e.g. `model.layers.`, `encoder.layer.`), group 2 the
    index. A container only counts as a whole dotted name part (not `sublayers.`)."""
    words = sorted(map(re.escape, rules()["layer_containers"]), key=len, reverse=True)
    return re.compile(rf"^((?:.*?\.)?(?:{'|'.join(words)})\.)(\d+)\.")


def get_path(config: dict, key: str) -> Any:
    """config[key], where a dotted key names a field of a sub-config (DBRX's `ffn_config.ffn_hidden_size`)."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def set_path(config: dict, key: str, value: Any) -> None:
    """config[key] = value, copying each sub-config a dotted key passes through (the source's stay as read)."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[last] = value


@lru_cache(maxsize=1)
def module_list_re() -> re.Pattern:
    """`.<list>.<i>.` for the module lists of `fields.module_lists`: one entry per layer of a kind,
    held outside the layer container (Zamba2's shared block holds an adapter per hybrid layer), whose
    index the twin's count replaces as it replaces the experts'."""
    words = sorted(map(re.escape, rules()["fields"].get("module_lists") or []), key=len, reverse=True)
    return re.compile(rf"\.({'|'.join(words)})\.(\d+)\.")


def field_value(config: dict, role: str) -> tuple[str | None, Any]:
    """The first spelling of `role` the config carries, and its value. A layer count no count
    field states is the length of a per-layer list (`fields.layer_lists`): such a family derives
    its count from the list, so the key is None (the twin's count field is the class's default
    spelling, and its list is subsampled onto the kept layers)."""
    for key in rules()["fields"][role]:
        if get_path(config, key) is not None:
            return key, get_path(config, key)
    if role == "layers":
        for key in rules()["fields"].get("layer_lists") or []:
            if isinstance(config.get(key), list) and config[key]:
                return None, len(config[key])
    return None, None


# ---- names ----

def split_name(name: str) -> tuple[int | None, str]:
    """(decoder layer index, key): the key has `{L}` for the layer index and `*` for the expert, so
    names equal up to the layer and expert count share a key."""
    key = EXPERT_RE.sub(".experts.*.", name)
    if rules()["fields"].get("module_lists"):
        key = module_list_re().sub(lambda m: f".{m.group(1)}.*.", key)
    m = layer_re().match(key)
    if not m:
        return None, key
    return int(m.group(2)), f"{m.group(1)}{{L}}.{key[m.end():]}"


def layer_signatures(tensors: dict[str, TensorMeta]) -> dict[int, frozenset[tuple[str, str]]]:
    """Per decoder layer: its tensor leaves (experts collapsed) with their dtypes. Two layers of
    one signature are the same kind of layer (dense/MoE, quantized or not, indexer or not)."""
    sigs: dict[int, set[tuple[str, str]]] = {}
    for name, meta in tensors.items():
        layer, key = split_name(name)
        if layer is not None:
            sigs.setdefault(layer, set()).add((key.split("{L}.", 1)[1], meta.dtype))
    return {i: frozenset(s) for i, s in sigs.items()}


def assemble(*, source: str, kind: str, config: dict, tensors: dict[str, TensorMeta], files: list[str] | None = None,
             tokenizer: TokenizerInfo | None = None, hf_quant: dict | None = None,
             origin: MirrorOrigin | None = None) -> SourceLayout:
    if "text_config" in config or "vision_config" in config:
        raise ConfigError(source, None, "config.json", "composite (multimodal) checkpoints are not mirrored yet: "
                                                       "only a text decoder's layout is")
    if not config.get("model_type"):
        raise ConfigError(source, None, "model_type", "config.json names no model_type")
    return SourceLayout(
        source=source, kind=kind, model_type=config["model_type"],
        architectures=list(config.get("architectures") or []), config=config,
        auto_map=config.get("auto_map") or {}, tensors=tensors, files=list(files or []),
        tokenizer=tokenizer or TokenizerInfo(), quant=parse_quant(config, hf_quant, tensors),
        structure=detect_structure(config, tensors), origin=origin)


def quant_groups(tensors: dict[str, TensorMeta], method: str | None) -> dict[str, str]:
    """Module prefix -> scheme, for every prefix whose leaves match a scheme of mirror-families.yaml
    (the first whose `methods` name the config's quant_method, else the first that matches)."""
    leaves: dict[str, dict[str, str]] = {}
    for name, meta in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        leaves.setdefault(prefix, {})[leaf] = meta.dtype
    schemes = rules()["schemes"]
    found: dict[str, str] = {}
    for prefix, have in leaves.items():
        hits = [s for s, spec in schemes.items()
                if all(leaf in have and (want == "any" or have[leaf] == want) for leaf, want in spec["match"].items())]
        if hits:
            by_method = [s for s in hits if method in schemes[s].get("methods", [])]
            found[prefix] = (by_method or hits)[0]
    return found


def parse_quant(config: dict, hf_quant: dict | None, tensors: dict[str, TensorMeta]) -> QuantLayout:
    qc, where = config.get("quantization_config"), "config.json"
    if not qc and hf_quant:  # ModelOpt's older layout keeps it in a file of its own
        qc, where = {"quant_method": "modelopt", **hf_quant.get("quantization", hf_quant)}, HF_QUANT_FILE
    qc = qc or {}
    weights = _first_weights_group(qc)
    ignored_key = next((k for k in rules()["quant_config"]["ignored_keys"] if qc.get(k) is not None), None)
    kv = next((qc[k] for k in rules()["quant_config"]["kv_cache_keys"] if qc.get(k)), None)
    counts: dict[str, int] = {}
    for scheme in quant_groups(tensors, qc.get("quant_method")).values():
        counts[scheme] = counts.get(scheme, 0) + 1
    scale_leaves = tuple("." + leaf for leaf in rules()["scale_leaves"])
    block = qc.get("weight_block_size") or weights.get("block_structure")
    return QuantLayout(
        method=qc.get("quant_method"), algo=qc.get("quant_algo") or qc.get("format"), schemes=counts,
        bits=qc.get("bits") or qc.get("w_bit") or weights.get("num_bits"),
        group_size=qc.get("group_size") or qc.get("q_group_size") or weights.get("group_size"),
        weight_block_size=list(block) if block else None, activation_scheme=qc.get("activation_scheme"),
        kv_cache=json.dumps(kv, sort_keys=True) if isinstance(kv, dict) else kv,
        kv_scales=sum(1 for n in tensors if n.endswith(scale_leaves)),
        ignored_key=ignored_key, ignored=list(qc.get(ignored_key) or []) if ignored_key else [],
        config=qc, config_file=where if qc else None)


def _first_weights_group(qc: dict) -> dict:
    # compressed-tensors: config_groups.<name>.weights holds num_bits / group_size / block_structure
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            return group["weights"]
    return {}


def detect_structure(config: dict, tensors: dict[str, TensorMeta]) -> Structure:
    num_layers = int(field_value(config, "layers")[1] or 0)
    stems: dict[str, int] = {}
    layer_ids: set[int] = set()
    indexer: set[str] = set()
    for name in tensors:
        m = layer_re().match(name)
        if m:
            stems[m.group(1)] = stems.get(m.group(1), 0) + 1
            layer_ids.add(int(m.group(2)))
            if ".indexer." in name:
                indexer.add(split_name(name)[1].split("{L}.", 1)[1])
    _, experts = field_value(config, "experts")
    _, mtp = field_value(config, "mtp")
    names = set(tensors)
    return Structure(
        num_layers=num_layers, layer_stem=max(stems, key=stems.get) if stems else None,
        moe=bool(experts) or any(".experts." in n for n in names), experts=experts,
        top_k=field_value(config, "top_k")[1], shared_experts=field_value(config, "shared_experts")[1],
        n_group=field_value(config, "n_group")[1], topk_group=field_value(config, "topk_group")[1],
        first_dense=field_value(config, "first_dense")[1],
        mla=field_value(config, "mla")[1] is not None, dsa=field_value(config, "dsa")[1] is not None or bool(indexer),
        indexer_tensors=sorted(indexer), mtp_layers=int(mtp or 0),
        mtp_layer_indices=sorted(i for i in layer_ids if i >= num_layers),
        tied_embeddings=bool(config.get("tie_word_embeddings")), lm_head="lm_head.weight" in names)
