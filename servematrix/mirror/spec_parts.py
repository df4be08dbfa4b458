"""What a finished Builder hands on: the ForgeSpec's extra_tensors and fp8_blocks (the part of the
twin the forge writes itself) and the post-processing steps (the part it cannot).

Separate from tensors.py, which plans the twin's tensors: these only read a Builder's result and
phrase it as the forge's and twin.py's inputs.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter

from servematrix.checkpoint.forge_spec import ExtraTensor, Fp8Blocks
from servematrix.mirror.layout import TensorMeta, rules
from servematrix.mirror.plan_models import TORCH_DTYPE, PostStep
from servematrix.mirror.tensors import Builder

_LAYER_IN_NAME = re.compile(r"^(.*?layers\.)(\d+)\.")
_EXPERT_IN_NAME = re.compile(r"\.experts\.(\d+)\.")


def extra_tensors(built: Builder) -> list[ExtraTensor]:
    """One `{layer}` entry where a tensor is in every main layer alike, else one per name."""
    by_key: dict[str, dict[int | None, TensorMeta]] = {}
    for name, meta in built.extras.items():
        m = _LAYER_IN_NAME.match(name)
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
    wanted = {t.prefix + ".weight": t for t in built.targets if t.forge}
    names = [n for n in built.forged if n.endswith(".weight")]
    globs: dict[str, list[int]] = {}
    for name, t in sorted(wanted.items()):
        block = [t.params["block_n"], t.params["block_k"]]
        for glob in (_EXPERT_IN_NAME.sub(".experts.*.", _LAYER_IN_NAME.sub(r"\1*.", name)),
                     _EXPERT_IN_NAME.sub(".experts.*.", name), name):
            hits = {n for n in names if fnmatch.fnmatchcase(n, glob)}
            if hits <= set(wanted) and all(wanted[h].params == t.params for h in hits):
                globs.setdefault(glob, block)
                break
    covered = {n for g in globs for n in names if fnmatch.fnmatchcase(n, g)}
    globs = {g: b for g, b in globs.items()
             if not any(g != o and {n for n in names if fnmatch.fnmatchcase(n, g)} <=
                        {n for n in names if fnmatch.fnmatchcase(n, o)} for o in globs)}
    assert covered == set(wanted), "every forged FP8 weight is covered by a glob"
    return [Fp8Blocks(tensors=g, block=b) for g, b in sorted(globs.items())]


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
    # weights random like the forged ones; scales and norms 1.0 (a random scale could be <= 0)
    return ExtraTensor(name=name, shape=list(meta.shape), random=len(meta.shape) >= 2, value=1.0,
                       dtype=TORCH_DTYPE[meta.dtype])
