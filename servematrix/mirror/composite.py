"""A composite (multimodal) checkpoint's twin: its text model planned as every text twin is
(plan.plan_twin on the text sub-config, under the same invariants), each tower (a vision or audio
encoder with a transformers class of its own) shrunk under the layout's invariants (heads every TP
divides), and the connector's tensors (a projector) with shapes in the twin's config fields, all
in one ForgeSpec the forge writes: the text model under its prefix by its causal-LM class, each
tower by its own class (forge.py `components`), the connector as extra tensors, and the config
nested as the published one is (text_config, vision_config, the composite's own fields).

What a composite is made of (its parts' config keys, name prefixes, the tower's size fields, the
connector's tensors, the ids that count from the end of the text vocabulary) is data: a Composite,
e.g. servematrix/data/sweep-multimodal.yaml's entry per model_type. Nothing here names a family.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from servematrix.config.fields import shape_templates
from servematrix.errors import ConfigError

__all__ = ["Composite", "TextPart", "Tower", "plan_composite", "text_layout", "tower_config"]

# a shape entry: an int, or `<config key>.<field>` of the twin (text_config.hidden_size), or K*that
_DIM = re.compile(r"^(?:(?P<k>[1-9]\d*)\*)?(?P<key>[a-z_][a-z0-9_]*)\.(?P<field>[a-z_][a-z0-9_]*)$")
Shapes = shape_templates(_DIM, "<config key>.<field> (K* allowed)")
# what the forge writes at the top of config.json itself (or what a copy of the twin must not carry)
_TOP_OWNED = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
              "quantization_config")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    """The language model: its config under `config_key`, its tensors under `prefix` (the causal-LM
    class's own names after it: language_model.model.layers.N...)."""

    config_key: str
    prefix: str


class Tower(_Strict):
    """An encoder with a transformers class of its own (AutoModel of its config's model_type), its
    config under `config_key`, its tensors under `prefix` (less `strip` of the class's own names).
    `fields`: its config's spelling of hidden, ffn, heads and layers. The twin keeps the published
    config's other fields (image and patch size, activation) and shrinks these four: `heads_per_rank`
    heads on each rank of the largest TP (so every TP of the sweep divides them), `head_dim` wide,
    the published FFN ratio, `layers` layers."""

    config_key: str
    prefix: str
    strip: str = ""
    fields: dict[str, str]
    head_dim: int = Field(16, ge=1, le=256)
    heads_per_rank: int = Field(2, ge=1, le=16)
    layers: int = Field(2, ge=1, le=8)

    @field_validator("fields")
    @classmethod
    def _roles(cls, fields: dict[str, str]) -> dict[str, str]:
        missing = {"hidden", "ffn", "heads", "layers"} - set(fields)
        if missing:
            raise ValueError(f"name the config field of each of hidden, ffn, heads, layers (missing {sorted(missing)})")
        return fields


class Composite(_Strict):
    """One composite family's parts, as its published checkpoints lay them out."""

    architecture: str  # the composite's class (transformers' and vLLM's name)
    names_from: str  # where the tensor names below were read
    text: TextPart
    towers: list[Tower]
    tensors: Shapes = Field(default_factory=dict)  # connector: name -> shape
    token_ids: list[str] = Field(default_factory=list)  # top-level ids counted from the end of the text vocabulary
    vocab: list[str] = Field(default_factory=list)  # top-level copies of the text vocabulary size
    # a tower field that must equal another part's twin field (PaliGemma's vision_config.projection_dim is its
    # text model's hidden size): "<tower config key>.<field>": "<config key>.<field>"
    ties: dict[str, str] = Field(default_factory=dict)

    @field_validator("ties")
    @classmethod
    def _tied(cls, ties: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}: {v}" for k, v in ties.items() if not (_DIM.match(k) and _DIM.match(v)) or "*" in k + v]
        if bad:
            raise ValueError(f"ties are <config key>.<field>: <config key>.<field>, not {bad}")
        return ties


def text_layout(config: dict[str, Any], parts: Composite, source: str, where=None):
    """The SourceLayout of the composite's text model: its sub-config as a config.json of its own
    (the mirror's config-only path, the class built on the meta device at full size), with its
    causal-LM class as its architecture (a published text_config may name none)."""
    from servematrix.mirror.layout import TokenizerInfo
    from servematrix.mirror.source import causal_lm_class, config_layout

    text = config.get(parts.text.config_key)
    if not isinstance(text, dict) or not text.get("model_type"):
        raise ConfigError(where or source, None, parts.text.config_key, "missing, or names no model_type")
    # a published sub-config may state only what differs from its class's defaults (llava-1.5's text_config
    # names no size at all: Llama's defaults are Vicuna-7B's): the sizes the plan reads are the class's then
    from transformers import AutoConfig

    from servematrix.mirror.layout import field_value, rules

    defaults = AutoConfig.for_model(text["model_type"]).to_dict()
    filled = {}
    for role in ("layers", "hidden", "heads", "kv_heads", "ffn", "positions"):
        for key in rules()["fields"].get(role) or []:
            if key in defaults and defaults[key] is not None and field_value(text, role)[1] is None:
                filled[key] = defaults[key]
                break
    text = {**filled, **text, "architectures": [causal_lm_class(text["model_type"])]}
    # a sub-config carries no dtype of its own in some copies: the composite's
    if not (text.get("torch_dtype") or text.get("dtype")) and (config.get("torch_dtype") or config.get("dtype")):
        text["torch_dtype"] = config.get("torch_dtype") or config.get("dtype")
    return config_layout(text, source, where=where, tokenizer=TokenizerInfo(chat_template=True),
                         drop=("quantization_config",))


def tower_config(published: dict[str, Any], tower: Tower, tps: list[int]) -> tuple[dict[str, Any], dict[str, list]]:
    """The tower's twin config (the published one with its four sizes shrunk) and the sizes changed
    (field -> [published, twin]). Heads: `heads_per_rank` on each rank of the largest TP, rounded to a
    multiple of every TP; FFN: the published ratio to the hidden size, a whole number per rank."""
    from transformers import AutoConfig

    model_type = published.get("model_type")
    try:
        full = AutoConfig.for_model(model_type, **{k: v for k, v in published.items() if k != "model_type"}).to_dict()
    except Exception as exc:  # noqa: BLE001 - the class refuses the published config: one line
        raise ConfigError(tower.config_key, None, "model_type", f"{model_type!r}: transformers cannot read it: "
                                                                f"{type(exc).__name__}: {exc}") from None
    f = tower.fields
    unit = math.lcm(*tps)
    heads = unit * -(-tower.heads_per_rank * max(tps) // unit)
    hidden = heads * tower.head_dim
    ratio = full[f["ffn"]] / full[f["hidden"]]
    ffn = unit * max(1, round(hidden * ratio / unit))
    twin = {f["hidden"]: hidden, f["ffn"]: ffn, f["heads"]: heads, f["layers"]: min(tower.layers, full[f["layers"]])}
    config = {k: v for k, v in published.items() if k != "model_type"}
    config.update(twin)
    return config, {k: [full[k], v] for k, v in twin.items()}


def _shape(dims: list[int | str], configs: dict[str, dict]) -> list[int]:
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
            continue
        m = _DIM.match(d.replace(" ", ""))
        value = (configs.get(m["key"]) or {}).get(m["field"]) if m else None
        if not isinstance(value, int):
            raise ConfigError("composite tensors", None, d, "names no integer field of the twin's configs")
        out.append(int(m["k"] or 1) * value)
    return out


def _tower_layout(model_type: str, config: dict, tower: Tower, dtype: str) -> dict:
    """The tower's tensors as the forge's components step writes them (AutoModel of its config on
    the meta device, `strip`ped, under `prefix`), in the twin's dtype."""
    import torch
    from transformers import AutoConfig, AutoModel

    from servematrix.mirror.layout import TensorMeta
    from servematrix.mirror.source import _st_dtype

    cfg = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg, dtype=getattr(torch, dtype))
    out = {}
    for name, t in model.state_dict().items():
        if tower.strip and name.startswith(tower.strip):
            name = name[len(tower.strip):]
        out[tower.prefix + name] = TensorMeta(dtype=_st_dtype(getattr(torch, dtype)), shape=tuple(t.shape))
    return out


def plan_composite(config: dict[str, Any], parts: Composite, max_pp: int, tp_values: list[int], source: str,
                   where=None):
    """The Plan of a composite's twin (plan_models.Plan, as plan_twin returns for a text model), for
    every layout of max_pp and tp_values at once; build_twin writes it. Its invariants are the text
    plan's and, per tower, heads every TP divides, a hidden size that is whole heads, an FFN every TP
    divides, a layer count at most the published one; then the forge's own limits."""
    from servematrix.config.forge_spec import Component, ExtraTensor, ForgeSpec
    from servematrix.mirror.layout import TensorMeta
    from servematrix.mirror.plan import plan_twin
    from servematrix.mirror.plan_models import Invariant, NotMirrored
    from servematrix.mirror.source import _st_dtype

    import torch

    if config.get("model_type") is None or (config.get("architectures") or [parts.architecture])[0] != parts.architecture:
        raise ConfigError(where or source, None, "architectures", f"{config.get('architectures')}: the composite "
                                                                  f"described is {parts.architecture}")
    layout = text_layout(config, parts, source, where)
    text = plan_twin(layout, max_pp, tp_values)
    if text.post:
        raise ConfigError(where or source, None, parts.text.config_key,
                          "its text twin needs post-processing steps, which a composite's forge cannot apply: "
                          + "; ".join(s.detail for s in text.post)[:200])
    tps = sorted(set(tp_values))
    dtype = text.spec.dtype
    twin_configs = {parts.text.config_key: {**layout.config, **text.spec.config}}
    components, towers, dims, checks = [], {}, {f"{parts.text.config_key}.{k}": v for k, v in text.dims.items()}, []
    for tower in parts.towers:
        published = config.get(tower.config_key)
        if not isinstance(published, dict) or not published.get("model_type"):
            raise ConfigError(where or source, None, tower.config_key, "missing, or names no model_type")
        tcfg, changed = tower_config(published, tower, tps)
        twin_configs[tower.config_key] = tcfg
        dims.update({f"{tower.config_key}.{k}": v for k, v in changed.items()})
        components.append(dict(model_type=published["model_type"], config=tcfg, prefix=tower.prefix,
                               strip=tower.strip, config_key=tower.config_key))
    for target, source_field in parts.ties.items():  # after every part is shrunk: the twin's own values
        key, field = target.split(".", 1)
        if key not in {t.config_key for t in parts.towers}:
            raise ConfigError(where or source, None, target, "a tie sets a tower's field (the text model is planned)")
        value = _shape([source_field], twin_configs)[0]
        twin_configs[key][field] = value  # the tower's component config is this same dict
        dims[target] = [(config.get(key) or {}).get(field), value]
    for tower, comp in zip(parts.towers, components):  # each tower's tensors once its config is final
        towers.update(_tower_layout(comp["model_type"], comp["config"], tower, dtype))
        checks += _tower_invariants(tower, comp["config"], tps, config[tower.config_key])
    extras, connector = [], {}
    for name, dims_ in parts.tensors.items():
        shape = _shape(dims_, twin_configs)
        extras.append(dict(name=name, shape=shape, random=True, dtype=dtype))
        connector[name] = TensorMeta(dtype=_st_dtype(getattr(torch, dtype)), shape=tuple(shape))
    vocab = text.spec.tokenizer.vocab_size
    source_vocab = (config.get(parts.text.config_key) or {}).get("vocab_size") or layout.config.get("vocab_size")
    top = {k: v for k, v in config.items()
           if k not in _TOP_OWNED and k != parts.text.config_key and k not in {t.config_key for t in parts.towers}}
    notes = list(text.notes)
    for key in parts.token_ids:  # an id past the text vocabulary's end keeps its place from the end
        if isinstance(top.get(key), int) and isinstance(source_vocab, int):
            top[key] = vocab - (source_vocab - top[key])
    for key in parts.vocab:
        if key in top:
            top[key] = vocab
    if parts.token_ids or parts.vocab:
        notes.append(f"top-level ids {parts.token_ids} counted from the end of the twin's {vocab}-token vocabulary as in "
                     f"the published {source_vocab}; {parts.vocab} = {vocab}")
    fields = dict(model_type=config["model_type"], architecture=parts.architecture, config=text.spec.config,
                  dtype=dtype, seed=text.spec.seed, tokenizer=text.spec.tokenizer, extra_tensors=extras,
                  text_model_type=layout.model_type, text_prefix=parts.text.prefix,
                  text_config_key=parts.text.config_key, components=components, config_json=top)
    try:
        spec, refused = ForgeSpec(**fields), None
    except ValidationError as exc:
        spec, refused = ForgeSpec.model_construct(**fields), "; ".join(str(e["msg"]) for e in exc.errors())[:400]
    forged = {parts.text.prefix + n: m for n, m in text.forged.items()} | towers | connector
    checks.append(Invariant(name="forge accepts", rule="the composite's ForgeSpec passes the forge's own validation",
                            holds=refused is None, detail=refused or "valid"))
    return text.model_copy(update=dict(
        source=source, model_type=config["model_type"], architecture=parts.architecture,
        text_model_type=layout.model_type, dims=dims, spec=spec, forged=forged, twin=forged,
        invariants=[i.model_copy(update={"name": f"{parts.text.config_key}: {i.name}"}) if i.name != "forge accepts"
                    else i for i in text.invariants if i.name != "forge accepts"] + checks,
        not_mirrored=list(text.not_mirrored) + [NotMirrored(
            what="processor", reason="no image/audio processor or special tokens are written: the twin is load-checked, "
                                     "not served")],
        notes=notes))


def _tower_invariants(tower: Tower, cfg: dict, tps: list[int], published: dict):
    from servematrix.mirror.plan_models import Invariant

    f, key = tower.fields, tower.config_key
    heads, hidden, ffn, layers = cfg[f["heads"]], cfg[f["hidden"]], cfg[f["ffn"]], cfg[f["layers"]]
    return [
        Invariant(name=f"{key}: heads", rule="every TP divides the tower's attention heads (vLLM splits them)",
                  holds=all(heads % t == 0 for t in tps), detail=f"{heads} heads, TP {tps}"),
        Invariant(name=f"{key}: head width", rule="the hidden size is whole heads", holds=hidden % heads == 0,
                  detail=f"{hidden} / {heads}"),
        Invariant(name=f"{key}: ffn", rule="every TP divides the tower's FFN width", holds=all(ffn % t == 0 for t in tps),
                  detail=f"{ffn}, TP {tps}"),
        Invariant(name=f"{key}: layers", rule="at least one layer, at most the published count",
                  holds=1 <= layers <= int(published.get(f["layers"]) or layers), detail=str(layers)),
    ]
