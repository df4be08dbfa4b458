"""The twin's config side: the source config as transformers reads it, the ForgeSpec's config
(widths shrunk, per-layer lists subsampled, what the class rewrites carried as it reads it back),
the quantization_config remapped onto the twin's layers and experts, and what of the source's
config the twin cannot mirror.

Separate from plan.py, which chooses the layers, widths and tensors: everything here reads and
writes config.json fields only. diff.py remaps a quantization_config with remap_module too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from servematrix.checkpoint.forge import read_field
from servematrix.errors import ConfigError
from servematrix.mirror.layout import SourceLayout, field_value, layer_re, rules, set_path
from servematrix.mirror.plan_models import NotMirrored

_EXPERT_IN_MODULE = re.compile(r"\.experts\.(\d+)(?=\.|$)")
_MISSING = object()


def effective_config(layout: SourceLayout, class_type: str) -> dict[str, Any]:
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
    index_lists = set(rules()["fields"]["layer_index_lists"])  # remapped below, whatever their length
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == n and n > 1 and key not in index_lists:
            config[key] = [value[s] for s in kept]
            changed.add(key)
    # per-layer lists the class derives from the source's own fields (MiMo-V2-Flash's layer_types
    # from its hybrid pattern rule): subsampled onto the kept layers too, else the class derives
    # them afresh for the twin's layer count and they no longer say what the kept layers are
    for key, value in effective.items():
        if key not in config and key not in owned and key not in index_lists and isinstance(value, list) \
                and len(value) == n and n > 1 \
                and all(isinstance(v, str) for v in value):
            config[key] = [value[s] for s in kept]
            changed.add(key)
    for key in rules()["fields"].get("tail_counts") or []:  # the last N layers: as many as the twin kept of them
        if isinstance(config.get(key), int) and 0 < config[key] < n:
            config[key] = sum(1 for s in kept if s >= n - config[key])
            changed.add(key)
    for key in rules()["fields"].get("layer_strings") or []:
        if isinstance(config.get(key), str) and len(config[key]) == n and n > 1:
            config[key] = "".join(config[key][s] for s in kept)
            changed.add(key)
    for key in rules()["fields"]["layer_index_lists"]:
        # stated, or derived by the class from a rule of its own (Llama 4's moe_layers from its
        # interleave step): the kept layers' indices, else the class derives them afresh for the twin
        # and a kept MoE layer may become dense
        source = config.get(key) if key in config else effective.get(key)
        if isinstance(source, list):
            config[key] = [j for j, s in enumerate(kept) if s in set(source)]
            changed.add(key)
    for key in rules()["fields"].get("layer_overrides") or []:
        if isinstance(config.get(key), dict):
            config[key] = layer_overrides(config[key], kept, dims)
            changed.add(key)
    for key, (_, value) in dims.items():
        set_path(config, key, value)
        changed.add(key.split(".", 1)[0])
    for key, (_, value) in dims.items():  # a per-layer width list, shrunk whole: onto the kept layers too
        if isinstance(value, list) and len(value) == n and n > 1:
            config[key] = [value[s] for s in kept]
    layers_key = field_value(effective, "layers")[0] or "num_hidden_layers"
    config[layers_key] = len(kept)
    changed.add("num_hidden_layers")
    for key in rules()["fields"]["layers"]:  # a second spelling of the count (NomicBert's n_layer): the same
        if key != layers_key and effective.get(key) == n and key in layout.config:
            config[key] = len(kept)
            changed.add(key)
    defaults = AutoConfig.for_model(class_type).to_dict()
    explicit = {k for role in rules()["fields"]["explicit"] for k in rules()["fields"][role]}
    for key in explicit:
        if key not in config and effective.get(key) is not None:
            config[key] = effective[key]
    config = {k: v for k, v in config.items() if k in changed or k in explicit or defaults.get(k, _MISSING) != v}
    restated = (rules()["fields"].get("restated_layers") or {}).get(layers_key)
    if restated:  # the class derives this count from the one it reads (HRM): stated its way, left to the class
        config.pop(layers_key)
        config.update({key: len(kept) for key in restated})
    config = json.loads(json.dumps(config))  # a JSON object, as config.json and the spec's hash hold it
    notes = []
    try:
        built = AutoConfig.for_model(class_type, **config)
    except Exception as exc:  # noqa: BLE001 - the class refuses the shrunk widths: one line, no traceback
        raise ConfigError(layout.source, None, "twin config", f"transformers' {class_type} config refuses the "
                                                              f"shrunk config {config}: {type(exc).__name__}: {exc}") from None
    moved = [k for k, v in config.items() if not same_value(read_field(built, k, _MISSING), v)]
    if moved:
        for k in moved:
            config.pop(k)
        read = built.to_dict()
        derived = {k: v for k, v in read.items() if k not in owned and k not in config and defaults.get(k, _MISSING) != v}
        config.update(derived)
        notes.append(f"config fields {moved} are rewritten by transformers' {class_type} config; the twin "
                     f"carries them as the class reads them back: {sorted(derived)}")
        built = AutoConfig.for_model(class_type, **config)
        still = [k for k, v in config.items() if not same_value(read_field(built, k, _MISSING), v)]
        for k in still:
            config.pop(k)
        if still:
            notes.append(f"config fields {still} do not survive transformers' {class_type} config: left out")
    return config, notes


def layer_overrides(source: dict, kept: list[int], dims: dict) -> dict[str, dict]:
    """A heterogeneous config's per-layer overrides ({layer index: {field: value}}, index keys as
    JSON strings, zero-padded or not) onto the kept layers: the twin's layer j has source layer
    kept[j]'s overrides, each width scaled as its role's field was (Gemma 4's full-attention
    head_dim 512 over head_dim 256 stays twice the twin's head_dim), else the role's twin value."""
    fields = rules()["fields"]
    by_index = {int(k): v for k, v in source.items()}
    out = {}
    for j, s in enumerate(kept):
        if not by_index.get(s):
            continue
        scaled = {}
        for key, value in by_index[s].items():
            role = next((r for r in ("head_dim", "kv_heads", "heads", "hidden", "ffn") if key in fields[r]), None)
            src, twin = dims.get(key, (None, None)) if role else (None, None)
            if isinstance(value, int) and isinstance(src, int) and isinstance(twin, int) and src:
                value = value * twin // src if (value * twin) % src == 0 else twin
            scaled[key] = value
        out[str(j)] = scaled
    return out


def saved_away(layout: SourceLayout, config: dict, class_type: str, kept: list[int]) -> dict[str, Any]:
    """The source's layer count and per-layer strings (`fields.layer_strings`, one character a layer)
    as the twin's config.json must state them where transformers' class does not save them (it
    derives them from a list instead: NemotronH's num_hidden_layers and hybrid_override_pattern).
    A checkpoint that ships its own configuration module (auto_map) is read through that module,
    which reads config.json as it is: vLLM builds NemotronH's layers from hybrid_override_pattern."""
    from transformers import AutoConfig

    n = layout.structure.num_layers
    want: dict[str, Any] = {}
    layers_key = field_value(layout.config, "layers")[0]
    if layers_key:
        want[layers_key] = len(kept)
    for key in rules()["fields"].get("layer_strings") or []:
        value = layout.config.get(key)
        if isinstance(value, str) and len(value) == n:
            want[key] = "".join(value[s] for s in kept)
    try:
        saved = AutoConfig.for_model(class_type, **config).to_dict()
    except Exception:  # noqa: BLE001 - twin_config has refused such a config already, with its reason
        return {}
    return {k: v for k, v in want.items() if k not in saved}


def same_value(got: Any, want: Any) -> bool:
    # a sub-config the class reads into an object of its own (DBRX's ffn_config) reads back unchanged
    # where every field given reads back so
    if isinstance(want, dict) and hasattr(got, "to_dict"):
        read = got.to_dict()
        return all(same_value(read.get(k, _MISSING), v) for k, v in want.items())
    # a class that expands one value to one per layer (Gemma 3n's intermediate_size) reads it back unchanged
    per_layer = isinstance(want, int) and isinstance(got, (list, tuple)) and bool(got) and all(g == want for g in got)
    return got == want or per_layer or (isinstance(want, list) and isinstance(got, (list, tuple)) and list(got) == want)


def dim_map(layout: SourceLayout, cfg: dict, dims: dict, vocab: int) -> dict[int, int]:
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
    # an absolute position table's length (kept unless the plan shrinks it): last, so a width
    # that happens to equal it keeps its own mapping
    key, positions = field_value(cfg, "positions")
    if isinstance(positions, int):
        out.setdefault(positions, dims[key][1] if key in dims else positions)
    return out


def twin_config_json(layout: SourceLayout, layer_map: dict[int, int], experts: int | None) -> dict[str, Any]:
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
    m = layer_re().match(name + ".")
    if m and int(m.group(2)) in layer_map:
        name = f"{m.group(1)}{layer_map[int(m.group(2))]}.{name[m.end():]}".rstrip(".")
    if experts:
        name = _EXPERT_IN_MODULE.sub(lambda e: f".experts.{int(e.group(1)) % experts}", name)
    return name


def unmirrored_config(layout: SourceLayout) -> list[NotMirrored]:
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
