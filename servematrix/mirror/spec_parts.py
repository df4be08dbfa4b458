"""What a finished Builder hands on: the ForgeSpec's extra_tensors, fp8_blocks and quantize (the part of the
twin the forge writes itself) and the post-processing steps (the part it cannot).

Separate from tensors.py, which plans the twin's tensors: these only read a Builder's result and
phrase it as the forge's and twin.py's inputs.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter

from servematrix.config.forge_spec import ExtraTensor, Fp8Blocks
from servematrix.config.quantize import loads_kv_scales
from servematrix.mirror.layout import TensorMeta, layer_re, rules
from servematrix.mirror.plan_models import TORCH_DTYPE, PostStep
from servematrix.mirror.tensors import Builder

_EXPERT_IN_NAME = re.compile(r"\.experts\.(\d+)\.")


def extra_tensors(built: Builder) -> list[ExtraTensor]:
    """The extras the forge adds, but for the KV-cache scales `quantize:` writes (kv_scales)."""
    kv = kv_scales(built)
    return [e for e in _grouped_extras(built) if kv is None or e.name not in (kv["k_scale"], kv["v_scale"])]


def kv_scales(built: Builder) -> dict | None:
    """The `kv_cache_scales` entry for a source whose every main layer carries one float32 scalar
    k_scale and one v_scale (the forge writes them 1.0), where the checkpoint's method loads them;
    else None (they stay extras)."""
    if built.quant_method is None or not loads_kv_scales(built.method["method"] if built.method else None):
        return None
    found = {}
    for e in _grouped_extras(built):
        leaf = e.name.rpartition(".")[2]
        if "{layer}" in e.name and leaf in ("k_scale", "v_scale") and e.shape == [] and e.dtype == "float32":
            found.setdefault(leaf, []).append(e.name)
    if sorted(found) != ["k_scale", "v_scale"] or any(len(v) != 1 for v in found.values()):
        return None
    return {"method": "kv_cache_scales", "k_scale": found["k_scale"][0], "v_scale": found["v_scale"][0]}


def _grouped_extras(built: Builder) -> list[ExtraTensor]:
    """One `{layer}` entry where a tensor is in every main layer alike, else one per name."""
    by_key: dict[str, dict[int | None, TensorMeta]] = {}
    for name, meta in built.extras.items():
        m = layer_re().match(name)
        key = f"{m.group(1)}{{layer}}.{name[m.end():]}" if m else name
        by_key.setdefault(key, {})[int(m.group(2)) if m else None] = meta
    out = []
    for key, per_layer in sorted(by_key.items()):
        metas = set(per_layer.values())
        if set(per_layer) == set(range(built.k_main)) and len(metas) == 1:
            out.append(_extra(key, next(iter(metas))))
        else:
            out += [_extra(key.replace("{layer}", str(i)) if i is not None else key, meta)
                    for i, meta in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    return out


def fp8_blocks(built: Builder) -> list[Fp8Blocks]:
    """Globs over the forged names that hit exactly the weights to store as FP8 blocks."""
    wanted = {t.prefix + ".weight": (t.params["block_n"], t.params["block_k"])
              for t in built.targets if t.forge and t.method is None}
    # the names of the linears `quantize:` writes too: an FP8 glob must not turn them to FP8 first
    names = {n for n in built.forged if n.endswith(".weight")} | {t.prefix + ".weight" for t in built.targets if t.method}
    globs = _globs(wanted, sorted(names))
    return [Fp8Blocks(tensors=g, block=list(b)) for g, b in sorted(globs.items())]


def quantize(built: Builder) -> list[dict]:
    """The `quantize:` entries: the one weight method the forge writes (Builder.method), its
    `tensors` globs hitting exactly the linears it forges, and the KV-cache scales."""
    wanted = {t.prefix + ".weight": 0 for t in built.targets if t.method is not None}
    kv = kv_scales(built)
    names = sorted({n for n in built.forged if n.endswith(".weight")} | set(wanted))
    weights = [{**built.method, "tensors": sorted(_globs(wanted, names))}] if wanted else []
    return weights + ([kv] if kv else [])


def _globs(wanted: dict[str, object], names: list[str]) -> dict[str, object]:
    """Globs over `names` (layer, then expert indices made `*`) each hitting only wanted names of
    one key, together covering every wanted name; a glob another one covers is dropped."""
    globs: dict[str, object] = {}
    for name, key in sorted(wanted.items()):
        for glob in (_EXPERT_IN_NAME.sub(".experts.*.", layer_re().sub(r"\1*.", name)),
                     _EXPERT_IN_NAME.sub(".experts.*.", name), name):
            hits = {n for n in names if fnmatch.fnmatchcase(n, glob)}
            if hits <= set(wanted) and all(wanted[h] == key for h in hits):
                globs.setdefault(glob, key)
                break
    covered = {n for g in globs for n in names if fnmatch.fnmatchcase(n, g)}
    globs = {g: b for g, b in globs.items()
             if not any(g != o and {n for n in names if fnmatch.fnmatchcase(n, g)} <=
                        {n for n in names if fnmatch.fnmatchcase(n, o)} for o in globs)}
    assert covered == set(wanted), "every wanted weight is covered by a glob"
    return globs


def post_steps(built: Builder) -> list[PostStep]:
    """The steps twin.py applies after forging, one per kind: quantize (per scheme), cast, add, drop."""
    steps = []
    by_scheme: dict[str, list[str]] = {}
    for t in built.targets:
        if not t.forge:
            by_scheme.setdefault(t.scheme, []).append(t.prefix)
    for scheme, prefixes in sorted(by_scheme.items()):
        steps.append(PostStep(op="quantize", names=prefixes, detail=f"{len(prefixes)} linears re-written in the "
                              f"{scheme} layout ({', '.join(rules()['schemes'][scheme]['tensors'])}) with the "
                              "source's dtypes"))
    if built.casts:
        pairs = Counter(f"{a}->{b}" for a, b in built.casts.values())
        steps.append(PostStep(op="cast", names=sorted(built.casts),
                              detail=f"{len(built.casts)} tensors cast to the source's dtype ({dict(pairs)})"))
    if built.added:
        dts = Counter(built.twin[n].dtype for n in built.added)
        steps.append(PostStep(op="add", names=sorted(built.added),
                              detail=f"{len(built.added)} tensors of dtypes the forge's extra_tensors do not "
                                     f"offer ({dict(dts)})"))
    if built.dropped:
        steps.append(PostStep(op="drop", names=sorted(built.dropped),
                              detail=f"{len(built.dropped)} tensors the class writes but the source lacks"))
    return steps


def _extra(name: str, meta: TensorMeta) -> ExtraTensor:
    if meta.dtype == "I64":  # an index buffer (Builder._extras admits no other integer extra): 0..P-1
        return ExtraTensor(name=name, shape=list(meta.shape), arange=True, dtype="int64")
    # weights random like the forged ones; scales and norms 1.0 (a random scale could be <= 0)
    return ExtraTensor(name=name, shape=list(meta.shape), random=len(meta.shape) >= 2, value=1.0,
                       dtype=TORCH_DTYPE[meta.dtype])
