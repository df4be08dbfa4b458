"""Shrink a SourceLayout into a tiny twin under stated invariants, each checked and reported.

The twin's config is the source's with its widths shrunk (mirror-families.yaml names the fields);
transformers' own class, built on the meta device, says which tensors the forge will write for it.
Everything else the source carries is mapped onto that: its decoder layers onto the kept layers,
its experts onto the twin's, its quantized linears re-laid out for the twin's widths by the rules
of mirror-families.yaml, its extra tensors (KV-cache scales, MTP layers) added. What the forge can
write itself goes into the ForgeSpec; the rest is a post-processing step (twin.py applies it).

The config side (the twin's config.json fields) is plan_config.py; the models a plan is made of
are plan_models.py, which checks.py and tensors.py build too.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from pydantic import ValidationError

from servematrix.config.forge_spec import ForgeSpec, TokenizerSpec
from servematrix.errors import ArgumentError, ConfigError
from servematrix.mirror.checks import invariants
from servematrix.mirror.dims import KV_POLICIES, choose_dims
from servematrix.mirror.family_config import cpu_overrides, missing_fields
from servematrix.mirror.layout import SourceLayout, TensorMeta, field_value, layer_signatures, quant_groups, rules
from servematrix.mirror.plan_config import (dim_map, effective_config, saved_away, twin_config, twin_config_json,
                                            unmirrored_config)
from servematrix.mirror.plan_models import TORCH_DTYPE, Invariant, NotMirrored, Plan, PostStep
from servematrix.mirror.schemes import infer_params
from servematrix.mirror.source import causal_lm_class, meta_layout
from servematrix.mirror.spec_parts import extra_tensors, fp8_blocks, post_steps, quantize
from servematrix.mirror.tensors import Builder, MappedSource


def plan_twin(layout: SourceLayout, max_pp: int, tp_values: list[int], kv_policy: str = "cover",
              align: dict[str, int] | None = None) -> Plan:
    if max_pp < 1 or not tp_values or min(tp_values) < 1:
        raise ArgumentError("--pp/--tp", "max PP and every TP value must be >= 1")
    if kv_policy not in KV_POLICIES:
        raise ArgumentError("--kv-policy", " or ".join(KV_POLICIES))
    tps = sorted(set(tp_values))
    model_type, text_model_type, arch = _resolve_class(layout)
    forge_arch = _forge_architecture(model_type, text_model_type, arch)
    class_type = text_model_type or model_type
    effective = effective_config(layout, class_type)
    notes: list[str] = []
    filled = missing_fields(model_type, effective)
    if filled:  # a checkpoint without fields vLLM reads: the twin carries the family's (its own values win)
        layout = layout.model_copy(update={"config": {**layout.config, **filled}})
        effective = {**effective, **filled}
        notes.append(f"config fields the source lacks, filled from mirror-families.yaml model_type_config: {filled} "
                     "(vLLM reads them: the source's config as it is would not build there)")
    not_mirrored: list[NotMirrored] = []

    kept, layer_map, k_main = select_layers(layout, max_pp, effective)
    groups = quant_groups(layout.tensors, layout.quant.method)
    params, group_info = _group_params(layout, groups, not_mirrored)
    dims, kv_rule, dim_notes = choose_dims(effective, tps, group_info, params, kv_policy, align)
    notes += dim_notes
    config, moved = twin_config(layout, effective, class_type, dims, kept)
    notes += moved
    config, device_notes = cpu_overrides(model_type, config)
    dtype = _dominant_dtype(layout, groups)
    vocab = rules()["targets"]["vocab_size"]
    # the forge sets its tokenizer's ids; here any ids inside the twin's vocab (they shape no tensor), as
    # ints: a strict configuration class refuses None (CwmConfig: "Field 'bos_token_id' expected int")
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    try:
        base = meta_layout(class_type, {**config, **ids, "vocab_size": vocab, "architectures": [arch]}, TORCH_DTYPE[dtype])
    except Exception as exc:  # noqa: BLE001 - the shrunk config is refused by the class: say which, no traceback
        raise ConfigError(layout.source, None, "twin config", f"transformers' {arch} refuses the shrunk config "
                                                               f"{config}: {type(exc).__name__}: {exc}") from None

    mapped = MappedSource(layout, layer_map, groups)
    experts_key, experts = field_value(effective, "experts")
    experts = dims[experts_key][1] if experts_key in dims else experts  # the twin's count, shrunk or not
    built = Builder(base, mapped, group_info, params, dtype, k_main, experts, dim_map(layout, effective, dims, vocab),
                    quant_method=layout.quant.method)
    built.run()
    not_mirrored += built.not_mirrored

    fields = dict(
        model_type=model_type, architecture=forge_arch, config=config, dtype=TORCH_DTYPE[dtype],
        tokenizer=TokenizerSpec(vocab_size=vocab, chat_template=layout.tokenizer.chat_template or layout.kind == "model_type"),
        extra_tensors=extra_tensors(built), fp8_blocks=fp8_blocks(built), quantize=quantize(built),
        text_model_type=text_model_type,
        config_json={**saved_away(layout, config, class_type, kept), **twin_config_json(layout, layer_map, experts)},
        remote_code=bool(layout.auto_map) or text_model_type is not None)
    try:
        spec, refused = ForgeSpec(**fields), None
    except ValidationError as exc:  # the forge's own limits: reported as a failed invariant, nothing forged
        spec, refused = ForgeSpec.model_construct(**fields), "; ".join(_refusal(e, fields) for e in exc.errors())
    plan = Plan(
        source=layout.source, model_type=model_type, architecture=arch, text_model_type=text_model_type,
        max_pp=max_pp, tp=tps, kv_policy=kv_policy, kept_layers=kept, layer_map=layer_map, experts=experts,
        dims={k: list(v) for k, v in dims.items()}, spec=spec, forged=built.forged, twin=built.twin,
        quant=built.targets, post=post_steps(built) + _architecture_step(forge_arch, arch), invariants=[], not_mirrored=not_mirrored + unmirrored_config(layout),
        notes=notes, device_overrides=device_notes)
    checks = invariants(plan, layout, effective, config, class_type, kv_rule, mapped, base)
    checks.append(Invariant(name="forge accepts", rule="the ForgeSpec passes the forge's own validation (its size "
                                                       "limits)", holds=refused is None, detail=refused or "valid"))
    return plan.model_copy(update={"invariants": checks})


def _refusal(error: dict, fields: dict) -> str:
    """One forge refusal as the user needs it: the field, its value in the twin, and the rule (what
    would be accepted). The forge's field errors carry their location in ctx['at'], pydantic's own
    in 'loc'."""
    at = tuple((error.get("ctx") or {}).get("at") or error.get("loc") or ())
    value: object = fields
    for part in at:
        value = value.get(part, "?") if isinstance(value, dict) else "?"
    where = ".".join(map(str, at)) or "spec"
    shown = "" if value is fields else f" = {json.dumps(value, default=str)[:80]}"
    return f"{where}{shown}: {error['msg']}"


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


def _forge_architecture(model_type: str, text_model_type: str | None, arch: str) -> str:
    """The class the forge writes: the source's where transformers has it for the model_type (a
    causal LM, or an encoder such as BertModel: checkpoint.forge.model_class, which meta_layout
    builds too), so the scenario's spec alone rebuilds the twin; else the family's causal-LM class,
    whose save_pretrained names the config after itself, and post-processing gives config.json the
    source's architecture back."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from servematrix.checkpoint.forge import model_class

    if text_model_type is not None or model_class(model_type, arch) is not AutoModelForCausalLM:
        return arch
    if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return arch
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, arch)


def _architecture_step(forge_arch: str, arch: str) -> list[PostStep]:
    if forge_arch == arch:
        return []
    return [PostStep(op="architectures", names=[arch], detail=f"config.json's architectures set to the source's "
                                                              f"[{arch}] (the forge writes {forge_arch}, the "
                                                              "family's causal-LM class)")]


def select_layers(layout: SourceLayout, max_pp: int, effective: dict | None = None) -> tuple[list[int], dict[int, int], int]:
    """Kept source layers (sorted), the map of every source layer onto a twin layer, and the number
    of main layers. Kept: the first-dense layers, the first layer of every kind (signature: leaves
    and dtypes), then the lowest others until there are max_pp (max_pp x (first-dense + 1) where
    the source's first PP rank holds more than its first-dense layers); all layers up to the last of
    those where the family's layer kinds follow from the index (`fields.index_rule`); every source
    layer maps onto the nearest kept layer of its kind at or below it. MTP layers (past
    num_hidden_layers) follow. `effective`: the config as the class reads it (per-layer lists a
    config.json leaves to the class, as Gemma 4's layer_types), else the source's own."""
    st = layout.structure
    n = st.num_layers
    sigs = _layer_kinds(layout, layer_signatures(layout.tensors), effective or layout.config)
    kept = set(range(min(int(st.first_dense or 0), n)))
    first_of: dict[frozenset, int] = {}
    for i in range(n):
        first_of.setdefault(sigs.get(i, frozenset()), i)
    kept |= set(first_of.values())
    # where the source's first PP rank holds a layer past its first-dense ones (its layer count split
    # evenly, as vLLM splits it), the twin's must too: some models refuse a rank without an MoE layer
    # (afmoe: "No AfmoeMoE layer found in model.layers."), which the real checkpoint never meets there
    fkd = min(int(st.first_dense or 0), n)
    want = max_pp * (fkd + 1) if fkd and n // max_pp > fkd else max_pp
    for i in range(n):
        if len(kept) >= min(want, n):
            break
        kept.add(i)
    if any(layout.config.get(k) is not None for k in rules()["fields"].get("index_rule") or []):
        # the class gives layer i its kind by i itself (a period and offset): only a prefix of the
        # source's layers has the kinds the same fields give the twin's layers
        kept = set(range(max(kept) + 1))
    order = sorted(kept)
    layer_map: dict[int, int] = {}
    for i in range(n):
        same = [j for j, s in enumerate(order) if s <= i and sigs.get(s, frozenset()) == sigs.get(i, frozenset())]
        layer_map[i] = same[-1]
    for k, i in enumerate(st.mtp_layer_indices):
        layer_map[i] = len(order) + k
    return order, layer_map, len(order)


def _layer_kinds(layout: SourceLayout, sigs: dict[int, frozenset], config: dict) -> dict[int, frozenset]:
    """Each layer's kind: its tensors' signature, plus what the config says of it alone where its
    tensors do not show it (`fields.kind_lists`: per-layer lists of words, Gemma's sliding or full
    attention; `fields.tail_counts`: the last N layers, Gemma 3n's KV-sharing layers), so the twin
    keeps a layer of each."""
    n = layout.structure.num_layers
    f = rules()["fields"]
    lists = [(k, v) for k in f.get("kind_lists") or [] if isinstance(v := config.get(k), list) and len(v) == n
             and all(isinstance(x, str) for x in v)]
    tails = [(k, v) for k in f.get("tail_counts") or [] if isinstance(v := config.get(k), int) and 0 < v < n]
    if not lists and not tails:
        return sigs
    out = {}
    for i in range(n):
        extra = {(f"{k}=", str(v[i])) for k, v in lists} | {(f"{k}>", str(i >= n - v)) for k, v in tails}
        out[i] = sigs.get(i, frozenset()) | extra
    return {**sigs, **out}


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


def _dominant_dtype(layout: SourceLayout, groups: dict[str, str]) -> str:
    """The float dtype most of the source's unquantized values are in: the forge's dtype (tensors
    in another one are cast afterwards)."""
    sizes: Counter = Counter()
    for name, meta in layout.tensors.items():
        if meta.dtype in TORCH_DTYPE and name.rpartition(".")[0] not in groups:
            sizes[meta.dtype] += math.prod(meta.shape)
    return sizes.most_common(1)[0][0] if sizes else "BF16"
