"""`mirror --diff SOURCE TWIN`: a twin compared with its source, tensor names up to the layer and
expert count, dtypes per name, the quantization_config with its module lists remapped, and the
config fields the twin does not carry, each with its reason.

Separate from twin.py, which writes a twin: a diff reads two layouts (headers only) and writes
nothing, and it compares any two checkpoints, a twin mirror did not write among them.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from servematrix.mirror.layout import SourceLayout, field_value, layer_signatures, rules
from servematrix.mirror.plan_config import remap_module
from servematrix.mirror.plan_models import NotMirrored
from servematrix.mirror.tensors import canonical, canonical_dtypes, compare

__all__ = ["DiffItem", "DiffReport", "DtypeDiff", "diff", "infer_layer_map"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffItem(_Model):
    name: str
    reason: str


class DtypeDiff(_Model):
    name: str
    source: list[str]
    twin: list[str]


class DiffReport(_Model):
    """`mirror --diff SOURCE TWIN`: tensor names compared up to the layer and expert count (each
    source layer read as the twin layer standing for it), dtypes per name, the quantization_config
    with its module lists remapped, and everything the twin does not mirror, with the reason."""

    source: str
    twin: str
    layer_map: dict[int, int]
    names: int  # canonical names compared
    only_in_source: list[DiffItem] = Field(default_factory=list)
    only_in_twin: list[DiffItem] = Field(default_factory=list)
    dtypes: list[DtypeDiff] = Field(default_factory=list)
    quant_config: list[str] = Field(default_factory=list)  # differences, after remapping
    not_mirrored: list[NotMirrored] = Field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_in_source or self.only_in_twin or self.dtypes or self.quant_config)

    def render(self) -> str:
        lines = [f"diff {self.source} -> {self.twin}: {'names, dtypes and quantization_config equal' if self.equal else 'DIFFERENT'} "
                 f"({self.names} names up to layers/experts)"]
        lines += [f"  only in the source: {i.name} ({i.reason})" for i in self.only_in_source]
        lines += [f"  only in the twin: {i.name} ({i.reason})" for i in self.only_in_twin]
        lines += [f"  dtype {d.name}: source {d.source}, twin {d.twin}" for d in self.dtypes]
        lines += [f"  quantization_config {q}" for q in self.quant_config]
        lines += ["  not mirrored:"] + [f"    {n.what}: {n.reason}" for n in self.not_mirrored]
        return "\n".join(lines)


def infer_layer_map(source: SourceLayout, twin: SourceLayout) -> dict[int, int]:
    """Without the twin's mirror.json: each source layer onto a twin layer of the same kind (the
    same index where there is one, else the nearest below, else the first)."""
    s_sig, t_sig = layer_signatures(source.tensors), layer_signatures(twin.tensors)
    out = {}
    for i, sig in sorted(s_sig.items()):
        same = [j for j, t in sorted(t_sig.items()) if t == sig]
        out[i] = i if i in same else max([j for j in same if j < i], default=same[0] if same else min(i, max(t_sig, default=0)))
    return out


def diff(source_layout: SourceLayout, twin_layout: SourceLayout, layer_map: dict[int, int] | None = None) -> DiffReport:
    origin = twin_layout.origin
    lm = layer_map or (origin.layer_map if origin else None) or infer_layer_map(source_layout, twin_layout)
    src = canonical_dtypes(source_layout.tensors, lm)
    twin = canonical_dtypes(twin_layout.tensors)
    only_src, only_twin, dtypes = compare(src, twin)
    reasons = {n["what"]: n["reason"] for n in (origin.not_mirrored if origin else [])}
    return DiffReport(
        source=source_layout.source, twin=twin_layout.source, layer_map=lm, names=len(src),
        only_in_source=[DiffItem(name=c, reason=_reason(c, reasons, "the twin lacks it")) for c in only_src],
        only_in_twin=[DiffItem(name=c, reason=_reason(c, reasons, "the source lacks it")) for c in only_twin],
        dtypes=[DtypeDiff(name=c, source=s, twin=t) for c, s, t in dtypes],
        quant_config=_quant_config_diff(source_layout, twin_layout, lm),
        not_mirrored=[NotMirrored(what=w, reason=r) for w, r in reasons.items()] + _config_diff(source_layout, twin_layout))


def _reason(c: str, reasons: dict[str, str], default: str) -> str:
    # the plan's not-mirrored entries that name a tensor or a module prefix of it
    for what, reason in reasons.items():
        key = canonical(what) if "." in what else None
        if key and (c == key or c.startswith(key + ".")):
            return reason
    return f"unexplained: {default}"


def _quant_config_diff(source: SourceLayout, twin: SourceLayout, lm: dict[int, int]) -> list[str]:
    experts = field_value(twin.config, "experts")[1]
    want = dict(source.quant.config)
    key = source.quant.ignored_key
    if key and isinstance(want.get(key), list):
        want[key] = list(dict.fromkeys(remap_module(m, lm, experts) for m in want[key]))
    got = twin.quant.config
    return [f"{k}: source {want.get(k)!r}, twin {got.get(k)!r}" for k in sorted(set(want) | set(got))
            if want.get(k) != got.get(k)]


def _config_diff(source: SourceLayout, twin: SourceLayout) -> list[NotMirrored]:
    owned = set(rules()["fields"]["forge_owned"])
    out = []
    for k, v in sorted(source.config.items()):
        if k in owned or twin.config.get(k) == v:
            continue
        if k not in twin.config:
            reason = "not in the twin's config.json (transformers' class rewrites it; the twin carries its reading)"
        else:
            reason = f"{_short(v)} -> {_short(twin.config[k])} (shrunk, or subsampled onto the kept layers)"
        out.append(NotMirrored(what=f"config {k}", reason=reason))
    return out


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
