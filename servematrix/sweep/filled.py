"""Which of vLLM's parameters the twin filled: at TP=1 every parameter is whole, so after a passing
load check each must hold, bit for bit, a tensor of the twin (in a dtype vLLM may keep it in), a stack
vLLM builds from several (q/k/v, gate/up, every expert's), or the result of a transform vLLM applies
by design. A parameter that holds none was built and never filled from the checkpoint, which vLLM's
own check lets pass for every unquantized linear, or filled with a slice of a tensor whose shape the
loader never compared (docs/sweep-triage.md, "Passing cells whose load was hollow").

The rules are data (servematrix/data/sweep-filled.yaml): the stacks, the experts' layout and each
transform with where vLLM does it. The load check's digests are the same ones PP parity compares
(serve/loadcheck_worker._digest via sweep/digests)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config import packaged
from servematrix.config.fields import Regex
from servematrix.paths import data_file
from servematrix.sweep import digests

FILE = data_file("sweep-filled.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Experts(_Strict):
    pattern: Regex  # groups base (the layer's experts), index, part
    first: list[list[str]]  # the projections stacked into w13, in order (one list per spelling)
    second: list[str]  # the projection stacked into w2 (one per spelling)
    fused: Regex  # a layer's experts in one [experts, in, out] tensor, which vLLM holds as [experts, out, in]


class Transform(_Strict):
    pattern: Regex  # over vLLM's parameter name
    families: list[str] = Field(default_factory=list)  # cell keys (model_types, class names); none: every family
    why: str


class FilledRules(_Strict):
    stacked: list[list[str]]
    experts: Experts
    transforms: list[Transform]
    unused: list[Transform] = Field(default_factory=list)  # built and never filled by design


def rules() -> FilledRules:
    return packaged.load(FILE, FilledRules)


@functools.lru_cache(maxsize=8)
def held(twin: str) -> frozenset[str]:
    """Every digest a parameter filled from the twin at `twin` may have: each tensor's, each stack's
    (rules `stacked`, and the experts' w13/w2). Cached per twin: a sweep checks several cells of one."""
    from safetensors import safe_open

    r = rules()
    tensors = {}
    for path in sorted(Path(twin).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    out = {d for t in tensors.values() for d in digests.of(t)}
    for _, whole in stacks(tensors):
        out.update(digests.of(whole))
    out.update(_native_stacks(Path(twin), tensors))
    out.update(_expert_stacks(tensors, r.experts))
    return frozenset(out)


def stacks(tensors: dict) -> Iterator[tuple[list[str], object]]:
    """Each group of `tensors` (name -> tensor) that vLLM stacks into one parameter (rules `stacked`),
    as (its members' names, the members concatenated in vLLM's order); groups whose members cannot be
    concatenated (other trailing shapes or dtypes) are none."""
    import torch

    for group in rules().stacked:
        for name in tensors:
            if group[0] not in name:
                continue
            members = [name.replace(group[0], part) for part in group]
            if all(m in tensors for m in members) and _stackable([tensors[m] for m in members]):
                yield members, torch.cat([tensors[m] for m in members])


def _native_stacks(twin: Path, tensors: dict) -> set[str]:
    """A native twin's own stacks (sweep/native.py: derived from vLLM's class when it was built,
    e.g. EXAONE's c_fc_0 and c_fc_1 into gate_up_proj), which no family-wide rule above names."""
    import torch

    from servematrix.sweep.native import recorded_stacks

    out: set[str] = set()
    for members in recorded_stacks(twin):
        parts = [tensors.get(m) for m in members]
        if all(p is not None for p in parts) and _stackable(parts):
            out.update(digests.of(torch.cat(parts)))
    return out


def _stackable(parts) -> bool:
    return len({tuple(p.shape[1:]) for p in parts}) == 1 and len({p.dtype for p in parts}) == 1


def _expert_stacks(tensors: dict, rule: Experts) -> set[str]:
    """The digests of every MoE layer's w13 (each expert's first projections concatenated, stacked over
    the experts) and w2 (the second projection, stacked), and of fused experts as vLLM holds them."""
    import torch

    pattern, layers = re.compile(rule.pattern), {}
    for name, t in tensors.items():
        m = pattern.match(name)
        if m:
            layers.setdefault(m["base"], {}).setdefault(int(m["index"]), {})[m["part"]] = t
    out: set[str] = set()
    fused = re.compile(rule.fused)
    for name, t in tensors.items():
        if fused.search(name) and t.dim() == 3:
            out.update(digests.of(t.transpose(1, 2).contiguous()))
    for experts in layers.values():
        per = [experts[i] for i in sorted(experts)]
        for first in rule.first:
            if all(all(p in e for p in first) for e in per):
                w13 = [torch.cat([e[p] for p in first]) for e in per]
                if _stackable(w13):
                    out.update(digests.of(torch.stack(w13)))
        for second in rule.second:
            if all(second in e for e in per) and _stackable([e[second] for e in per]):
                out.update(digests.of(torch.stack([e[second] for e in per])))
    return out


def unfilled(keys: list[str], twin: Path, check_dir: Path, fields: tuple[str, ...] = ("digests",),
             also: tuple[Path, ...] = ()) -> list[str]:
    """The parameters the load check recorded (every rank's `fields`, a later one's digest of a name
    replacing an earlier's: the model's, or the draft's as loaded and then as shared) that hold no
    tensor, stack or transform of the twin (and of the checkpoint directories `also`, a draft's
    own), and that vLLM does not leave unread by design (rules `unused`); `keys` are the cell's
    families (model_type or class name, a draft's target) for its transforms."""
    r = rules()
    transforms = [re.compile(t.pattern) for t in (*r.transforms, *r.unused)
                  if not t.families or any(k in t.families for k in keys)]
    have = held(str(twin)).union(*(held(str(a)) for a in also))
    recorded = {n: d for field in fields for n, d in digests.recorded(check_dir, field).items()}
    return sorted(n for n, d in recorded.items() if d not in have and not any(p.search(n) for p in transforms))


# vLLM pre-fills an FP8 scale parameter with float32's smallest value (quantization/utils/fp8_utils.py
# FP8_SCALE_SENTINEL: shards combine by max, so an unloaded one never wins); real scales are positive
SCALE_LEAVES = ("weight_scale_inv", "weight_scale", "input_scale")


def unloaded_scales(check_dir: Path) -> list[str]:
    """The FP8 scales vLLM built and no checkpoint tensor reached, at any layout: each rank's recorded
    parameter holding nothing but vLLM's sentinel. A linear vLLM builds in FP8 while the checkpoint
    holds it in float loads by a cast into the FP8 weight with no error, and this scale is the trace it
    leaves (measured 2026-12-07: Gemma 3n's altup projections, Qwen3-Next's in_proj_ba)."""
    import json

    import torch

    from servematrix.serve.loadcheck_worker import _digest

    out = set()
    for name, digest in digests.recorded(check_dir).items():
        dtype, shape, _ = digest.split(":")
        if name.rsplit(".", 1)[-1] in SCALE_LEAVES and dtype == "torch.float32" and \
                digest == _digest(torch.full(json.loads(shape), torch.finfo(torch.float32).min)):
            out.add(name)
    return sorted(out)


# vLLM creates an attention layer's KV-cache scales holding -1.0 (quantization/kv_cache.py
# KVCacheScaleParameter) and, after loading, reads a negative one as "the checkpoint has none" and
# uses 1.0 (BaseKVCacheMethod.process_weights_after_loading): a scale the checkpoint carries and
# load_weights drops leaves no error, only an FP8 KV cache served unscaled
KV_SCALE_LEAVES = ("k_scale", "v_scale")


def unloaded_kv_scales(check_dir: Path) -> list[str]:
    """The KV-cache scales vLLM built that still hold its -1.0 after loading, on any rank: for a
    checkpoint that carries them for every attention layer, the ones load_weights dropped."""
    import torch

    from servematrix.serve.loadcheck_worker import _digest

    out = set()
    for name, digest in digests.recorded(check_dir).items():
        dtype, shape, _ = digest.split(":")
        if name.rsplit(".", 1)[-1] in KV_SCALE_LEAVES and shape == "[]" and dtype.startswith("torch.") and \
                digest == _digest(torch.tensor(-1.0, dtype=getattr(torch, dtype.removeprefix("torch.")))):
            out.add(name)
    return sorted(out)
