"""Shrink a SourceLayout into a tiny twin under stated invariants, each checked and reported.

The twin's config is the source's with its widths shrunk (mirror-families.yaml names the fields);
transformers' own class, built on the meta device, says which tensors the forge will write for it.
Everything else the source carries is mapped onto that: its decoder layers onto the kept layers,
its experts onto the twin's, its quantized linears re-laid out for the twin's widths by the rules
of mirror-families.yaml, its extra tensors (KV-cache scales, MTP layers) added. What the forge can
write itself goes into the ForgeSpec; the rest is a post-processing step (mirror.py applies it).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError

from servematrix.errors import ArgumentError, ConfigError
from servematrix.checkpoint.forge import ForgeSpec, TokenizerSpec
from servematrix.mirror.dims import choose_dims
from servematrix.mirror.layout import (LAYER_RE, SourceLayout, TensorMeta, field_value, layer_signatures,
                                       quant_groups, rules)
from servematrix.mirror.schemes import infer_params
from servematrix.mirror.source import causal_lm_class, meta_layout

_EXPERT_IN_MODULE = re.compile(r"\.experts\.(\d+)(?=\.|$)")
TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_MISSING = object()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Invariant(_Model):
    name: str
    rule: str
    holds: bool
    detail: str = ""


class NotMirrored(_Model):
    what: str
    reason: str


class QuantTarget(_Model):
    """One twin linear written in a quantized layout: the forge's fp8_blocks or a post-processing step."""

    prefix: str
    scheme: str
    forge: bool
    out: int
    in_: int
    params: dict[str, int]
    leaves: dict[str, TensorMeta]  # leaf -> the twin's tensor
    values: dict[str, list[int]] = Field(default_factory=dict)  # leaf -> content (weight_shape)


class PostStep(_Model):
    op: Literal["quantize", "cast", "add", "drop"]
    names: list[str]
    detail: str


class Plan(_Model):
    source: str
    model_type: str
    architecture: str
    text_model_type: str | None
    max_pp: int
    tp: list[int]
    kv_policy: str
    kept_layers: list[int]  # source layer of each twin layer
    layer_map: dict[int, int]  # every source layer -> the twin layer standing for it
    experts: int | None
    dims: dict[str, list[Any]]  # config field -> [source, twin]
    # validated where plan_twin builds it; one the forge refuses is kept unvalidated for the report
    # (its failed "forge accepts" invariant stops cli_mirror from writing anything)
    spec: SkipValidation[ForgeSpec]
    forged: dict[str, TensorMeta]  # what forge(spec) writes
    twin: dict[str, TensorMeta]  # after post-processing
    quant: list[QuantTarget]
    post: list[PostStep]
    invariants: list[Invariant]
    not_mirrored: list[NotMirrored]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(i.holds for i in self.invariants)

    @property
    def reproducible(self) -> bool:
        """True when the scenario's ForgeSpec alone rebuilds the twin (no post-processing)."""
        return not self.post


# ---- the plan ----

def plan_twin(layout: SourceLayout, max_pp: int, tp_values: list[int], kv_policy: str = "cover") -> Plan:
    if max_pp < 1 or not tp_values or min(tp_values) < 1:
        raise ArgumentError("--pp/--tp", "max PP and every TP value must be >= 1")
    if kv_policy not in ("cover", "faithful"):
        raise ArgumentError("--kv-policy", "cover or faithful")
    tps = sorted(set(tp_values))
    model_type, text_model_type, arch = _resolve_class(layout)
    class_type = text_model_type or model_type
    effective = _effective_config(layout, class_type)
    notes: list[str] = []
    not_mirrored: list[NotMirrored] = []

    kept, layer_map, k_main = select_layers(layout, max_pp)
    groups = quant_groups(layout.tensors, layout.quant.method)
    params, group_info = _group_params(layout, groups, not_mirrored)
    dims, kv_rule, dim_notes = choose_dims(effective, tps, group_info, params, kv_policy)
    notes += dim_notes
    config, moved = twin_config(layout, effective, class_type, dims, kept)
    notes += moved
    dtype = _dominant_dtype(layout, groups)
    vocab = rules()["targets"]["vocab_size"]
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # the forge sets its tokenizer's
    try:
        base = meta_layout(class_type, {**config, **ids, "vocab_size": vocab, "architectures": [arch]}, TORCH_DTYPE[dtype])
    except Exception as exc:  # noqa: BLE001 - the shrunk config is refused by the class: say which, no traceback
        raise ConfigError(layout.source, None, "twin config", f"transformers' {arch} refuses the shrunk config "
                                                               f"{config}: {type(exc).__name__}: {exc}") from None

    from servematrix.mirror.checks import invariants  # both import this module's models
    from servematrix.mirror.tensors import Builder, MappedSource

    mapped = MappedSource(layout, layer_map, groups)
    experts_key, experts = field_value(effective, "experts")
    experts = dims[experts_key][1] if experts_key in dims else experts  # the twin's count, shrunk or not
    built = Builder(base, mapped, group_info, params, dtype, k_main, experts, _dim_map(layout, effective, dims, vocab))
    built.run()
    not_mirrored += built.not_mirrored

    fields = dict(
        model_type=model_type, architecture=arch, config=config, dtype=TORCH_DTYPE[dtype],
        tokenizer=TokenizerSpec(vocab_size=vocab, chat_template=layout.tokenizer.chat_template or layout.kind == "model_type"),
        extra_tensors=built.extra_tensors(), fp8_blocks=built.fp8_blocks(),
        text_model_type=text_model_type,
        config_json=_config_json(layout, layer_map, experts),
        remote_code=bool(layout.auto_map) or text_model_type is not None)
    try:
        spec, refused = ForgeSpec(**fields), None
    except ValidationError as exc:  # the forge's own limits: reported as a failed invariant, nothing forged
        spec, refused = ForgeSpec.model_construct(**fields), "; ".join(e["msg"] for e in exc.errors())
    plan = Plan(
        source=layout.source, model_type=model_type, architecture=arch, text_model_type=text_model_type,
        max_pp=max_pp, tp=tps, kv_policy=kv_policy, kept_layers=kept, layer_map=layer_map, experts=experts,
        dims={k: list(v) for k, v in dims.items()}, spec=spec, forged=built.forged, twin=built.twin,
        quant=built.targets, post=built.post_steps(), invariants=[], not_mirrored=not_mirrored + _unmirrored_config(layout),
        notes=notes)
    checks = invariants(plan, layout, effective, config, class_type, kv_rule, mapped, base)
    checks.append(Invariant(name="forge accepts", rule="the ForgeSpec passes the forge's own validation (its size "
                                                       "limits)", holds=refused is None, detail=refused or "valid"))
    return plan.model_copy(update={"invariants": checks})


def _resolve_class(layout: SourceLayout) -> tuple[str, str | None, str]:
    """(model_type, text_model_type, architecture): a model_type only remote code knows is forged
    as a composite whose text model is the transformers class of its architecture."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = layout.architectures[0] if layout.architectures else causal_lm_class(layout.model_type)
    if layout.model_type in CONFIG_MAPPING:
        return layout.model_type, None, arch
    by_arch = [mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == arch and mt in CONFIG_MAPPING]
    if not by_arch:
        raise ConfigError(layout.source, None, "model_type", f"{layout.model_type!r} ({arch}) has no transformers "
                                                             "class here: the forge cannot write its tensors")
    return layout.model_type, by_arch[0], arch


def _effective_config(layout: SourceLayout, class_type: str) -> dict[str, Any]:
    """The source config as transformers' class reads it (its defaults filled in): the widths the
    source really has even where its config.json leaves a field out."""
    from transformers import AutoConfig

    owned = set(rules()["fields"]["forge_owned"])
    given = {k: v for k, v in layout.config.items() if k not in owned}
    try:
        read = AutoConfig.for_model(class_type, **given).to_dict()
    except Exception as exc:  # noqa: BLE001 - any refusal of the class is a config problem of the source
        raise ConfigError(layout.source, None, "config.json", f"transformers' {class_type} config refuses it: "
                                                              f"{type(exc).__name__}: {exc}") from None
    return {**read, **given}


def select_layers(layout: SourceLayout, max_pp: int) -> tuple[list[int], dict[int, int], int]:
    """Kept source layers (sorted), the map of every source layer onto a twin layer, and the number
    of main layers. Kept: the first-dense layers, the first layer of every kind (signature: leaves
    and dtypes), then the lowest others until there are max_pp; every source layer maps onto the
    nearest kept layer of its kind at or below it. MTP layers (past num_hidden_layers) follow."""
    st = layout.structure
    n = st.num_layers
    sigs = layer_signatures(layout.tensors)
    kept = set(range(min(int(st.first_dense or 0), n)))
    first_of: dict[frozenset, int] = {}
    for i in range(n):
        first_of.setdefault(sigs.get(i, frozenset()), i)
    kept |= set(first_of.values())
    for i in range(n):
        if len(kept) >= max_pp:
            break
        kept.add(i)
    order = sorted(kept)
    layer_map: dict[int, int] = {}
    for i in range(n):
        same = [j for j, s in enumerate(order) if s <= i and sigs.get(s, frozenset()) == sigs.get(i, frozenset())]
        layer_map[i] = same[-1]
    for k, i in enumerate(st.mtp_layer_indices):
        layer_map[i] = len(order) + k
    return order, layer_map, len(order)


def _group_params(layout: SourceLayout, groups: dict[str, str], not_mirrored: list[NotMirrored]):
    """Per scheme: its parameters (config, else solved from the tensors) and one source linear."""
    q = layout.quant
    known = {"block_n": (q.weight_block_size or [None, None])[0], "block_k": (q.weight_block_size or [None, None])[-1],
             "group": q.group_size, "pack": q.pack}
    leaves: dict[str, dict[str, TensorMeta]] = {}
    for name, meta in layout.tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in groups:
            leaves.setdefault(prefix, {})[leaf] = meta
    params: dict[str, dict[str, int]] = {}
    tried: set[str] = set()
    for prefix, scheme in groups.items():  # one linear per scheme: a config holds one set of parameters
        if scheme in tried:
            continue
        tried.add(scheme)
        solved = infer_params(scheme, leaves[prefix], known)
        if solved is None:
            not_mirrored.append(NotMirrored(what=f"{scheme} linears (e.g. {prefix})",
                                            reason="their shapes fit no parameters of the scheme's layout"))
        else:
            params[scheme] = solved[0]
    by_prefix = {p: {"scheme": s, "leaves": leaves[p]} for p, s in groups.items() if s in params}
    return params, by_prefix


def twin_config(layout: SourceLayout, effective: dict, class_type: str, dims: dict, kept: list[int]):
    """The ForgeSpec's config: the source's fields (without what the forge owns), per-layer lists
    subsampled onto the kept layers, the shrunk widths; fields equal to the class's defaults left
    out; a field the class rewrites (rope_scaling -> rope_parameters) written the way the class
    reads it back, so the forge's check_config holds."""
    from transformers import AutoConfig

    owned = set(rules()["fields"]["forge_owned"])
    n = layout.structure.num_layers
    config = {k: v for k, v in layout.config.items() if k not in owned}
    changed = set(dims)
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == n and n > 1:
            config[key] = [value[s] for s in kept]
            changed.add(key)
    for key in rules()["fields"]["layer_index_lists"]:
        if isinstance(config.get(key), list):
            config[key] = [j for j, s in enumerate(kept) if s in set(config[key])]
            changed.add(key)
    config.update({k: v[1] for k, v in dims.items()})
    config[field_value(effective, "layers")[0] or "num_hidden_layers"] = len(kept)
    changed.add("num_hidden_layers")
    defaults = AutoConfig.for_model(class_type).to_dict()
    explicit = {k for role in rules()["fields"]["explicit"] for k in rules()["fields"][role]}
    for key in explicit:
        if key not in config and effective.get(key) is not None:
            config[key] = effective[key]
    config = {k: v for k, v in config.items() if k in changed or k in explicit or defaults.get(k, _MISSING) != v}
    config = json.loads(json.dumps(config))  # a JSON object, as config.json and the spec's hash hold it
    notes = []
    built = AutoConfig.for_model(class_type, **config)
    moved = [k for k, v in config.items() if not same_value(getattr(built, k, _MISSING), v)]
    if moved:
        for k in moved:
            config.pop(k)
        read = built.to_dict()
        derived = {k: v for k, v in read.items() if k not in owned and k not in config and defaults.get(k, _MISSING) != v}
        config.update(derived)
        notes.append(f"config fields {moved} are rewritten by transformers' {class_type} config; the twin "
                     f"carries them as the class reads them back: {sorted(derived)}")
        built = AutoConfig.for_model(class_type, **config)
        still = [k for k, v in config.items() if not same_value(getattr(built, k, _MISSING), v)]
        for k in still:
            config.pop(k)
        if still:
            notes.append(f"config fields {still} do not survive transformers' {class_type} config: left out")
    return config, notes


def same_value(got: Any, want: Any) -> bool:
    return got == want or (isinstance(want, list) and isinstance(got, (list, tuple)) and list(got) == want)


def _dominant_dtype(layout: SourceLayout, groups: dict[str, str]) -> str:
    """The float dtype most of the source's unquantized values are in: the forge's dtype (tensors
    in another one are cast afterwards)."""
    sizes: Counter = Counter()
    for name, meta in layout.tensors.items():
        if meta.dtype in TORCH_DTYPE and name.rpartition(".")[0] not in groups:
            sizes[meta.dtype] += math.prod(meta.shape)
    return sizes.most_common(1)[0][0] if sizes else "BF16"


def _dim_map(layout: SourceLayout, cfg: dict, dims: dict, vocab: int) -> dict[int, int]:
    """Source width -> twin width, for tensors the class does not write (MTP's eh_proj, extras):
    hidden_size first (most tensors are hidden-wide), then the vocab, then the other widths."""
    out: dict[int, int] = {}
    hidden_key = field_value(cfg, "hidden")[0]
    if hidden_key in dims:
        out[dims[hidden_key][0]] = dims[hidden_key][1]
    if layout.config.get("vocab_size"):
        out.setdefault(layout.config["vocab_size"], vocab)
    for src, twin in dims.values():
        if isinstance(src, int) and isinstance(twin, int):
            out.setdefault(src, twin)
    return out


def _config_json(layout: SourceLayout, layer_map: dict[int, int], experts: int | None) -> dict[str, Any]:
    """The quantization_config, its per-layer module lists remapped onto the twin's layers."""
    qc = layout.quant.config
    if not qc:
        return {}
    qc = dict(qc)
    key = layout.quant.ignored_key
    if key and isinstance(qc.get(key), list):
        qc[key] = list(dict.fromkeys(remap_module(m, layer_map, experts) for m in qc[key]))
    return {"quantization_config": qc}


def remap_module(name: str, layer_map: dict[int, int], experts: int | None) -> str:
    if not isinstance(name, str) or name.startswith("re:"):
        return name
    m = LAYER_RE.match(name + ".")
    if m and int(m.group(2)) in layer_map:
        name = f"{m.group(1)}layers.{layer_map[int(m.group(2))]}.{name[m.end():]}".rstrip(".")
    if experts:
        name = _EXPERT_IN_MODULE.sub(lambda e: f".experts.{int(e.group(1)) % experts}", name)
    return name


def _unmirrored_config(layout: SourceLayout) -> list[NotMirrored]:
    out = [NotMirrored(what="tokenizer", reason=f"replaced by the forge's {rules()['targets']['vocab_size']}-token "
                                                 "BPE (the twin's vocab must be small); source files: "
                                                 f"{', '.join(layout.tokenizer.files) or 'none'}"),
           NotMirrored(what="tensor shapes", reason="shrunk to the twin's widths (names and dtypes are mirrored)"),
           NotMirrored(what="weights", reason="random (the source's are never read)")]
    extra_auto = {k: v for k, v in layout.auto_map.items() if k != "AutoConfig"}
    if extra_auto:
        out.append(NotMirrored(what=f"auto_map {sorted(extra_auto)}",
                               reason="the forge ships a configuration module only; vLLM uses its own model code"))
    return out
