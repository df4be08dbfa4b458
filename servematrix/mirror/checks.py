"""The invariants a twin must keep, each checked on the finished plan and reported with its rule:
a twin that breaks one would answer "will vLLM load it at TP=t / PP=p" for another checkpoint."""

from __future__ import annotations

import math

from servematrix.mirror.dims import is_qkv, kv_class, qkv_sections, tp_role
from servematrix.mirror.layout import SourceLayout, TensorMeta, field_value, rules, split_name
from servematrix.mirror.plan_config import same_value
from servematrix.mirror.plan_models import Invariant, Plan
from servematrix.mirror.schemes import evaluate
from servematrix.mirror.tensors import MappedSource, canonical, canonical_dtypes, compare


def invariants(plan: Plan, layout: SourceLayout, effective: dict, config: dict, class_type: str, kv_rule: str,
               mapped: MappedSource, base: dict[str, TensorMeta]) -> list[Invariant]:
    twin_cfg = {**effective, **{k: v[1] for k, v in plan.dims.items()}, **config}
    return [
        _layers(plan, layout),
        _first_dense(plan, layout, twin_cfg),
        _layer_kinds(plan, layout, mapped, base),
        _mtp(plan, layout, effective, twin_cfg),
        _kv_heads(plan, effective, twin_cfg, kv_rule),
        _heads(plan, twin_cfg),
        _head_dim(twin_cfg),
        _experts(twin_cfg),
        _quantized_dims(plan, twin_cfg),
        _quant_layout(plan, mapped),
        _names_and_dtypes(plan, mapped),
        _vocab(plan),
        _config_read_back(config, class_type),
        _size(plan),
    ]


def _layers(plan: Plan, layout: SourceLayout) -> Invariant:
    k = len(plan.kept_layers)
    return Invariant(name="layers", rule="num_hidden_layers >= the largest PP the twin must serve (vLLM gives "
                                         "every PP rank whole layers)", holds=k >= plan.max_pp,
                     detail=f"{k} main layers (source {layout.structure.num_layers}) for PP <= {plan.max_pp}; "
                            f"kept source layers {plan.kept_layers}")


def _first_dense(plan: Plan, layout: SourceLayout, cfg: dict) -> Invariant:
    fkd = int(layout.structure.first_dense or 0)
    key, twin = field_value(cfg, "first_dense")
    holds = all(i in plan.kept_layers for i in range(fkd)) and (key is None or twin == fkd)
    return Invariant(name="first-dense layers", rule="the source's first_k_dense_replace dense layers are all kept, "
                                                     "before the MoE layers", holds=holds,
                     detail=f"first_k_dense_replace {fkd} -> {twin if key else 'n/a'}")


def _weights_per_layer(names, groups: set[str]) -> dict[int, set[str]]:
    # a layer's modules: its `.weight`s, a quantized linear counted as its weight
    out: dict[int, set[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" and canonical(prefix + ".weight")[: -len(".weight")] not in groups:
            continue
        layer, key = split_name(canonical(prefix + ".weight"))
        if layer is not None:
            out.setdefault(layer, set()).add(key.split("{L}.", 1)[1])
    return out


def _layer_kinds(plan: Plan, layout: SourceLayout, mapped: MappedSource, base: dict[str, TensorMeta]) -> Invariant:
    src_groups = set(mapped.groups)
    src = _weights_per_layer(mapped.dtypes, src_groups)
    twin = _weights_per_layer(base, set())
    bad = [f"twin layer {j} (source {s}): only source {sorted(src.get(j, set()) - twin.get(j, set()))[:3]}, "
           f"only twin {sorted(twin.get(j, set()) - src.get(j, set()))[:3]}"
           for j, s in enumerate(plan.kept_layers) if src.get(j, set()) != twin.get(j, set())]
    return Invariant(name="layer kinds", rule="every source layer maps onto a twin layer for which transformers' class "
                                              "builds the same modules (dense/MoE, indexer, shared experts)",
                     holds=not bad, detail="; ".join(bad[:3]) or f"layer map {_ranges(plan.layer_map)}")


def _ranges(layer_map: dict[int, int]) -> str:
    runs: list[list[int]] = []
    for i in sorted(layer_map):
        if runs and runs[-1][1] == i - 1 and layer_map[runs[-1][0]] == layer_map[i]:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}{'-' + str(b) if b != a else ''}->{layer_map[a]}" for a, b in runs)


def _mtp(plan: Plan, layout: SourceLayout, effective: dict, cfg: dict) -> Invariant:
    st = layout.structure
    k = len(plan.kept_layers)
    want = {k + i for i in range(len(st.mtp_layer_indices))}
    got = {layer for layer, _ in map(split_name, plan.twin) if layer is not None} - set(range(k))
    _, mtp = field_value(cfg, "mtp")
    # the source's count as its class reads it: a config.json that leaves the field to the class's
    # default (GLM-4.5's converter copy has no num_nextn_predict_layers) has the default's count
    _, src_mtp = field_value(effective, "mtp")
    src_mtp = int(src_mtp or st.mtp_layers or 0)
    holds = got == want and int(mtp or 0) == src_mtp
    detail = (f"{len(want)} MTP layers after the {k} main ones (num_nextn_predict_layers {mtp or 0})" if want else
              f"the source has no MTP tensors (num_nextn_predict_layers {src_mtp}"
              + ("; transformers' class does not build them)" if src_mtp else ")"))
    return Invariant(name="MTP layers", rule="the source's MTP layers (past num_hidden_layers) are kept, after the "
                                             "twin's main layers", holds=holds, detail=detail)


def _kv_heads(plan: Plan, src: dict, cfg: dict, rule: str) -> Invariant:
    _, kv_src = field_value(src, "kv_heads")
    _, kv = field_value(cfg, "kv_heads")
    if field_value(cfg, "mla")[1] is not None or not kv:
        return Invariant(name="kv heads", rule=rule, holds=True, detail="n/a")
    big = [t for t in plan.tp if t > 1]
    per = {t: (kv_class(kv_src, t), kv_class(kv, t)) for t in big}
    valid = all(c != "invalid" for _, c in per.values())
    detail = f"num_key_value_heads {kv_src} -> {kv}; " + ", ".join(
        f"TP={t}: {tw}" + (f" (source: {s})" if s != tw else "") for t, (s, tw) in per.items())
    return Invariant(name="kv heads", rule=rule, holds=valid, detail=detail)


def _heads(plan: Plan, cfg: dict) -> Invariant:
    _, h = field_value(cfg, "heads")
    _, kv = field_value(cfg, "kv_heads")
    if not h and not kv and not field_value(cfg, "head_dim")[1]:  # attention-free (Mamba): nothing to split
        return Invariant(name="attention heads", rule="attention heads only", holds=True, detail="n/a: no attention heads")
    kv = kv or h
    holds = bool(h) and h % kv == 0 and all(h % t == 0 for t in plan.tp)
    return Invariant(name="attention heads", rule="num_attention_heads is a multiple of num_key_value_heads and of "
                                                  "every TP", holds=holds, detail=f"{h} heads, {kv} KV heads, TP {plan.tp}")


def _head_dim(cfg: dict) -> Invariant:
    t = rules()["targets"]
    mla = field_value(cfg, "mla")[1] is not None
    _, hd = field_value(cfg, "head_dim")
    if not mla and not hd and not field_value(cfg, "heads")[1]:  # attention-free (Mamba): no head to size
        return Invariant(name="head_dim", rule="attention heads only", holds=True, detail="n/a: no attention heads")
    if mla:
        hd = cfg.get("qk_nope_head_dim", 0) + cfg.get("qk_rope_head_dim", 0)
    elif not hd:
        hd = field_value(cfg, "hidden")[1] // field_value(cfg, "heads")[1]
    return Invariant(name="head_dim", rule=f"head_dim >= {t['min_head_dim']} and a multiple of 32 (vLLM's CPU "
                                           f"attention head sizes), {t['head_dim']} where the source allows; MLA "
                                           "keeps the source's widths", holds=mla or (hd >= t["min_head_dim"] and hd % 32 == 0),
                     detail=f"head_dim {hd}" + (" (MLA: qk_nope + qk_rope, kept)" if mla else ""))


def _experts(cfg: dict) -> Invariant:
    _, e = field_value(cfg, "experts")
    if not e:
        return Invariant(name="experts", rule="dense model", holds=True, detail="n/a")
    _, k = field_value(cfg, "top_k")
    _, ng = field_value(cfg, "n_group")
    _, tg = field_value(cfg, "topk_group")
    k = k or 1
    grouped = not ng or ng == 1 or (e % ng == 0 and e // ng >= 2 and k <= (tg or ng) * (e // ng))
    return Invariant(name="experts", rule="experts > top_k (a real choice), divisible by n_group with >= 2 per group, "
                                          "top_k <= topk_group x experts per group", holds=e >= 2 * k and grouped,
                     detail=f"{e} experts, top-{k}, n_group {ng}, topk_group {tg}")


def _quantized_dims(plan: Plan, cfg: dict) -> Invariant:
    _, kv = field_value(cfg, "kv_heads")
    bad = []
    partial = []
    for t in plan.quant:
        align = rules()["schemes"][t.scheme].get("align", {})
        u_out, u_in = evaluate(align.get("n", 1), t.params), evaluate(align.get("k", 1), t.params)
        ceil_ok = any("ceil" in str(e) for s in rules()["schemes"][t.scheme]["tensors"].values()
                      if s["shape"] != "source" for e in s["shape"])
        role = tp_role(t.prefix)
        for tp in plan.tp:
            out, in_ = t.out, t.in_
            split_out = role in ("column", "kv") and tp > 1
            split_in = role == "row" and tp > 1
            if role == "kv" and kv:
                out = t.out // kv * max(1, kv // tp)
            elif split_out:
                out = t.out // tp if t.out % tp == 0 else -1
            if split_in:
                in_ = t.in_ // tp if t.in_ % tp == 0 else -1
            checks = [("out", out, u_out, split_out), ("in", in_, u_in, split_in)]
            sections = qkv_sections(cfg, tp) if is_qkv(t.prefix) else None
            if sections:  # a fused q/k/v: vLLM cuts it into its sections, each whole units (also at TP=1)
                checks[:1] = [(f"out {s}", size, u_out, True) for s, size in zip("qkv", sections)]
            for dim, size, unit, split in checks:
                if size < 0 or size % unit:
                    (partial if ceil_ok and not split and size > 0 else bad).append(
                        f"{t.prefix} {dim} {size} per rank at TP={tp} (unit {unit})")
    bad += plan_misaligned(plan)
    detail = f"{len(plan.quant)} quantized linears" + (f"; not whole: {'; '.join(bad[:4])}" if bad else "")
    if partial:
        detail += f"; partial blocks on unsplit dims, as the source's: {len(partial)} (e.g. {partial[0]})"
    return Invariant(name="quantized dims", rule="every quantized linear's dims are whole blocks/groups/packs per TP "
                                                 "rank where TP splits them, each q/k/v section of a fused projection "
                                                 "at every TP (fp8 block: block_n x block_k; awq/gptq: "
                                                 "group_size divides in_features, the pack factor out_features; nvfp4: "
                                                 "group 16)", holds=not bad, detail=detail)


def plan_misaligned(plan: Plan) -> list[str]:
    return [n.what + ": " + n.reason for n in plan.not_mirrored if n.reason.startswith("misaligned")]


def _quant_layout(plan: Plan, mapped: MappedSource) -> Invariant:
    twin_groups = {canonical(t.prefix + ".weight")[: -len(".weight")]: t.scheme for t in plan.quant}
    lost = sorted(cp for cp in mapped.groups if cp not in twin_groups)
    wrong = sorted(cp for cp, s in twin_groups.items() if mapped.groups.get(cp) != s)
    detail = (f"schemes {dict(sorted(_count(twin_groups.values()).items()))}" if twin_groups else "no quantized linears")
    if lost or wrong:
        detail += f"; not re-laid out: {(lost + wrong)[:4]}"
    if mapped.mixed:
        detail += f"; modules quantized differently across layers/experts, the majority kept: {mapped.mixed[:3]}"
    return Invariant(name="quant layout", rule="every quantized linear of the source is quantized in the twin with "
                                               "the same scheme and leaves", holds=not lost and not wrong, detail=detail)


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _names_and_dtypes(plan: Plan, mapped: MappedSource) -> Invariant:
    only_src, only_twin, dtypes = compare(mapped.dtypes, canonical_dtypes(plan.twin))
    parts = [f"only in the source: {only_src[:3]}" if only_src else "", f"only in the twin: {only_twin[:3]}" if only_twin else "",
             f"dtypes differ: {dtypes[:3]}" if dtypes else ""]
    return Invariant(name="names and dtypes", rule="the twin's tensor names equal the source's up to the layer and "
                                                   "expert count, with the same dtype each", holds=not (only_src or only_twin or dtypes),
                     detail="; ".join(p for p in parts if p) or f"{len(mapped.dtypes)} canonical names")


def _vocab(plan: Plan) -> Invariant:
    limit = rules()["targets"]["max_vocab"]
    v = plan.spec.tokenizer.vocab_size
    return Invariant(name="vocab", rule=f"vocab_size <= {limit}", holds=v <= limit, detail=f"vocab_size {v}")


def _config_read_back(config: dict, class_type: str) -> Invariant:
    from transformers import AutoConfig

    from servematrix.checkpoint.forge import read_field

    built = AutoConfig.for_model(class_type, **config)
    drift = [f"{k}: {v!r} became {read_field(built, k)!r}" for k, v in config.items()
             if not same_value(read_field(built, k), v)]
    return Invariant(name="config read back", rule="transformers' AutoConfig reads every twin field back unchanged "
                                                   "(the forge's check_config)", holds=not drift,
                     detail="; ".join(drift[:3]) or f"{len(config)} fields via {class_type}")


def _size(plan: Plan) -> Invariant:
    limit = rules()["targets"]["max_params"]
    n = sum(math.prod(m.shape) for m in plan.twin.values())
    biggest = sorted(plan.twin.items(), key=lambda kv: -math.prod(kv[1].shape))[:2]
    return Invariant(name="size", rule=f"the twin holds <= {limit:,} values (a larger one has a width the plan "
                                       "does not shrink)", holds=n <= limit,
                     detail=f"{n:,} values; largest {[(k, list(v.shape)) for k, v in biggest]}")

