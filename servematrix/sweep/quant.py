"""A quantized cell's twin: the mirrored twin's ForgeSpec re-forged with the forge's own quantized
options, as data/sweep-quants.yaml says per `--quant` name and per model_type (the forge writes real FP8
values and scales from the forged weights; nothing here writes a tensor).

A twin whose linears no block of the list divides (with their TP shards), or whose attention has no
`k_proj` to carry KV-cache scales, gets the reason instead of a spec: its cells are "not checkable
here", never dropped.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from servematrix.config.forge_spec import ForgeSpec
from servematrix.config.quantize import BY_SCHEME, Fp8Block, tag
from servematrix.sweep.rules import QuantRule, load


class QuantSpec(BaseModel):
    """What a quantized twin is forged from, or why there is none."""

    spec: dict[str, Any] | None = None  # the ForgeSpec, dumped (layout(): only the fields the layout sets)
    note: str = ""  # the layout in words (block size, family rule), recorded on the cell
    reason: str | None = None
    narrow: bool = False  # no spec because the twin's linears are narrower than every block/group


def rules() -> dict[str, QuantRule]:
    return load().quants


def names() -> tuple[str, ...]:
    return ("none", *rules())


def _shards(name: str, shape: tuple[int, ...], tp: int,
            config: dict[str, Any] | None = None) -> list[list[tuple[int, int]]]:
    """The ways a rank at `tp` may hold the linear, each as the [n, k] pieces it loads, by the linear's
    TP role (mirror-families.yaml's tp_roles): column-parallel splits outputs, row-parallel inputs, a linear
    the table does not name may be either or neither (every piece must fit); KV
    projections split or replicate by the twin's KV heads as the mirror plans them (mirror/dims.py
    kv_class, vLLM's QKVParallelLinear), with the KV heads unknown either is accepted; a fused q/k/v
    projection is its q, k and v sections per rank (mirror/dims.py qkv_sections), each loaded as its own
    projection, so each must hold whole blocks (measured: phi3's 96-row k/v sections at TP=2 in 128-row
    blocks, `start (8) + length (2) exceeds dimension size (9)` in load_qkv_weight)."""
    from servematrix.mirror.dims import is_qkv, kv_class, qkv_sections, tp_role

    n, k = shape
    kv_heads = _kv_heads(config)
    prefix = name.removesuffix(".weight")
    role = tp_role(prefix)
    sections = qkv_sections(config, tp) if is_qkv(prefix) and config else None
    if sections and sum(qkv_sections(config, 1) or []) == n:  # the config's heads make up this tensor's rows
        return [[(s, k) for s in sections]]
    if role == "column":
        return [[(n // tp, k)]] if n % tp == 0 else []
    if role == "row":
        return [[(n, k // tp)]] if k % tp == 0 else []
    if role == "kv":
        if kv_heads is not None:  # measured: mixtral's 2 KV heads at TP=2 split, a 64-row shard of a 128 block
            how = kv_class(kv_heads, tp)
            return [[(n // tp, k)]] if how == "split" and n % tp == 0 else [[(n, k)]] if how == "replicated" else []
        return [[(n // tp, k)], [(n, k)]] if n % tp == 0 else [[(n, k)]]
    if tp == 1 or role in ("replicated", "unplanned"):
        return [[(n, k)]]
    # a linear the role table does not name (OPT's out_proj and fc1/fc2, a Mamba in_proj): vLLM may split
    # its outputs, its inputs or neither, so every piece it could hold must be whole blocks (measured before:
    # OPT's and StarCoder2's 128-wide row-parallel projections planned as whole, 64 inputs a rank at TP=2
    # against the CPU kernel's K block of 128, "Weight input_size_per_partition = 64 is not divisible")
    return [[(n, k)] + ([(n // tp, k)] if n % tp == 0 else []) + ([(n, k // tp)] if k % tp == 0 else [])]


def _fits(name: str, shape: tuple[int, ...], bn: int, bk: int, tps: list[int],
          config: dict[str, Any] | None = None) -> bool:
    return len(shape) == 2 and all(any(all(n % bn == 0 and k % bk == 0 for n, k in way)
                                       for way in _shards(name, shape, tp, config)) for tp in tps)


def _block(method: Fp8Block, shapes: dict[str, tuple[int, ...]], rule: QuantRule, tps: list[int],
           config: dict[str, Any] | None = None) -> int | None:
    selected = {n: s for n, s in shapes.items() if method.selects(n)}
    if not selected:
        return None
    return next((b for b in rule.blocks
                 if all(_fits(n, s, b, rule.block_k, tps, config) for n, s in selected.items())), None)


def _left_float(entries: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The decoder layers' 2-D weights (a layer index in the name) the weight method of `entries` leaves
    in float, as module names below the layer (`attention.wo`, a router's `mlp.gate`), so a note never
    says "every decoder linear" of a twin whose names the globs miss."""
    weights = [e for e in entries if e.get("method") != "kv_cache_scales"]
    if not weights:
        return []
    method = _method_of(weights[0])
    return sorted({re.sub(r"^.*?\.\d+\.", "", n).removesuffix(".weight") for n, s in shapes.items()
                   if len(s) == 2 and n.endswith(".weight") and re.search(r"\.\d+\.", n) and not method.selects(n)})


def _kv_heads(config: dict[str, Any] | None) -> int | None:
    """The twin's KV heads (its config's GQA field, else its attention heads), None if it has neither."""
    from servematrix.mirror.layout import field_value

    config = config or {}
    heads = field_value(config, "kv_heads")[1] or field_value(config, "heads")[1]
    return heads if isinstance(heads, int) and heads > 0 else None


def _method(rule: QuantRule, **fields):
    return _method_of({**rule.quantize, **fields})


def _method_of(entry: dict[str, Any]):
    return {tag(c): c for c in BY_SCHEME.values()}[entry["method"]].model_validate(entry)


def _misfit(method, name: str, shape: tuple[int, ...], tp: int, config: dict[str, Any] | None = None) -> str | None:
    """Why no TP shard of `name` at `tp` can be written in `method`'s layout, or None."""
    ways = _shards(name, shape, tp, config)
    if not ways:
        return f"{list(shape)} does not split over TP={tp}"
    problems = [next((f"{list(p)} at TP={tp}: {w}" for p in way if (w := method.misaligned(*p))), None) for way in ways]
    return None if None in problems else problems[0]


def _grouped(quant: str, rule: QuantRule, shapes: dict[str, tuple[int, ...]], tps: list[int],
             config: dict[str, Any] | None = None):
    """(the quantize entry, its note) with the first group size for which every selected linear's
    TP shard holds whole groups and packs (the method's own alignment rule), or (None, the reason)."""
    why = ""
    for group in rule.groups:
        method = _method(rule, group_size=group)
        selected = {n: s for n, s in shapes.items() if method.selects(n) and len(s) == 2}
        if not selected:
            return None, f"{quant}: the twin has no linear matching {method.tensors}", False
        bad = next(((n, w) for n, s in selected.items() for tp in tps
                    if (w := _misfit(method, n, s, tp, config))), None)
        if bad is None:
            return ({**rule.quantize, "group_size": group}, f"{quant}: every decoder linear {method.bits}-bit, "
                    f"group {group}", False)
        why = f"{bad[0].split('.')[-2]} {bad[1]}"
    return None, (f"{quant}: no group size of {rule.groups} makes every linear's TP shard whole groups and packs "
                  f"(group {rule.groups[-1]}: {why}): a twin this small cannot hold the layout"), True


def widen_units(quant: str, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], str] | str | None:
    """The alignment a twin (forged as `shapes`) too narrow for `quant` is re-planned with (data:
    `widen`), and why; or why it is not (a fused projection listed `unaligned`, which the plan cannot
    align section by section; the fused q/k/v projections of mirror-families.yaml it does); None where
    `quant` has no widening."""
    rule = rules().get(quant)
    if rule is None or rule.widen is None:
        return None
    modules = {n.split(".")[-2] for n in shapes if "." in n}  # model.layers.0.self_attn.qkv_proj.weight -> qkv_proj
    fused = sorted(modules & set(rule.widen.unaligned))
    if fused:
        return (f"not widened: a fused {', '.join(fused)} would need each section whole blocks per TP rank, "
                "which the mirror does not plan for it")
    return rule.widen.units(), rule.widen.why


def refused_on_cpu(quant: str, signature: str) -> bool:
    """Whether `signature` is vLLM's CPU build refusing this quantization (data: `cpu_refuses`)."""
    return quant in rules() and any(re.search(p, signature) for p in rules()[quant].cpu_refuses)


def quantized(model_type: str, spec: dict[str, Any], shapes: dict[str, tuple[int, ...]], quant: str,
              tps: list[int]) -> QuantSpec:
    """The ForgeSpec of `model_type`'s twin (`spec`, whose forged tensors are `shapes`) under `quant`."""
    q = layout(model_type, spec.get("config") or {}, shapes, quant, tps)
    if q.spec is None:
        return q
    try:
        forged = ForgeSpec.model_validate({**spec, **q.spec})
    except ValidationError as exc:  # the forge's own check of the layout: its first message is the reason
        return QuantSpec(reason=f"{quant}: the forge refuses the layout: {exc.errors()[0]['msg'][:300]}")
    return QuantSpec(spec=forged.model_dump(mode="json"), note=q.note)


def layout(model_type: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], quant: str,
           tps: list[int]) -> QuantSpec:
    """`quant`'s layout for a twin of `model_type` (its config, its tensors' `shapes`) at `tps`: the
    ForgeSpec fields it sets (`quantize` or `fp8_blocks`, `dtype`) as `spec`, or the reason there is none."""
    rule = rules()[quant]
    family = rule.families.get(model_type)
    if family is not None and not family.checkable:
        return QuantSpec(reason=f"{quant}: {family.why}")
    if family is not None and family.ignore:  # the family's published list of modules not converted
        rule = rule.model_copy(update={"quantize": {**rule.quantize, "ignore": family.ignore}})
    if family is not None and family.tensors:  # the family's own linears, which no shared glob names
        rule = rule.model_copy(update={"quantize": {**rule.quantize,
                                                    "tensors": [*rule.quantize["tensors"], *family.tensors]}})
    if family is not None and family.fp8_blocks:
        update: dict[str, Any] = {"fp8_blocks": family.fp8_blocks}
        note = family.why
    elif rule.groups:
        entry, note, narrow = _grouped(quant, rule, shapes, tps, config)
        if entry is None:
            return QuantSpec(reason=note, narrow=narrow)
        update = {"quantize": [entry]}
    else:
        probe = Fp8Block.model_validate(rule.quantize)
        block = _block(probe, shapes, rule, tps, config)
        if block is None:
            bad = sorted({f"{n.split('.')[-2]} {list(s)}" for n, s in shapes.items() if probe.selects(n)
                          and not _fits(n, s, rule.blocks[-1], rule.block_k, tps, config)})
            return QuantSpec(reason=f"{quant}: the CPU FP8 block kernel takes K blocks of {rule.block_k} only, and the "
                                    f"twin's linears are narrower at TP={','.join(map(str, tps))} "
                                    f"({'; '.join(bad[:4])}): a twin this small cannot hold the layout" if bad else
                                    f"{quant}: the twin has no linear matching {probe.tensors}", narrow=bool(bad))
        entries: list[dict[str, Any]] = [{**rule.quantize, "block": [block, rule.block_k]}]
        note = f"{quant}: every decoder linear FP8 e4m3 in {block}x{rule.block_k} blocks"
        if rule.kv_scales:  # on the layers with a k_proj (a hybrid's attention layers), as the forge writes them
            templates = rule.kv_scales.templates(shapes)
            if templates is None:
                return QuantSpec(reason=f"{quant}: the twin has no {rule.kv_scales.modules()} to hold the KV-cache "
                                        "scales (the names vLLM maps them from)")
            entries.append({"method": "kv_cache_scales", **templates})
            note += ", k_scale / v_scale per layer"
        update = {"quantize": entries}
    if family is not None and (family.ignore or family.tensors) and not family.fp8_blocks:
        note += f"; {family.why}"
    if left := _left_float(update.get("quantize", []), shapes):
        note += f"; not quantized (no glob of sweep-quants.yaml selects them): {', '.join(left)}"
    if dtype := rule.dtype_for.get(model_type, rule.dtype):
        update["dtype"] = dtype
    return QuantSpec(spec=update, note=note)
