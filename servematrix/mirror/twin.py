"""Writing a mirror twin: the forge run on the plan's ForgeSpec, then the post-processing steps
the forge cannot express (quantized layouts it has no option for, per-tensor dtypes, tensors the
class writes but the source lacks), checked against the plan's layout before and after.

The rest of `servematrix mirror` (see __init__.py): source.py reads the source, plan.py plans the
twin, diff.py compares it with its source, cli.py writes its scenario YAML and what the CLI prints.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from servematrix.checkpoint.forge import forge
from servematrix.checkpoint.quant_pack import FP8_MAX, fp8_block_quantize
from servematrix.errors import StateError
from servematrix.mirror.layout import MirrorOrigin, TensorMeta, rules
from servematrix.mirror.plan_models import Plan, QuantTarget
from servematrix.mirror.source import ORIGIN_FILE, check_twin_target, read_header

__all__ = ["build_twin", "post_process"]


def build_twin(plan: Plan, name: str, directory: Path | str, finish: Callable[[Path], None] | None = None) -> Path:
    """forge(name, plan.spec) into the cache, copied to `directory` and post-processed there (the
    cache entry stays what its spec says), with mirror.json; the written headers must be the plan's
    twin exactly. `finish(dir)` rewrites the checked twin before it is put in place (the sweep's
    released-checkpoint spellings): a twin in place is never rewritten, so a caller reusing it
    reads it as it is."""
    target = Path(directory)
    check_twin_target(target)  # the one owner check (source.py): only a twin mirror wrote is replaced
    try:
        forged = forge(name, plan.spec)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(f"forge:{name}", f"forging the twin failed: {type(exc).__name__}: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(forged, tmp, dirs_exist_ok=True)
        written = _headers(tmp)
        if written != plan.forged:
            raise StateError(forged, "the forge wrote another layout than planned: " + _layout_delta(plan.forged, written))
        post_process(tmp, plan)
        written = _headers(tmp)
        if written != plan.twin:
            raise StateError(tmp, "post-processing wrote another layout than planned: " + _layout_delta(plan.twin, written))
        if finish is not None:
            finish(tmp)
        origin = MirrorOrigin(source=plan.source, layer_map=plan.layer_map, experts=plan.experts,
                              not_mirrored=[n.model_dump() for n in plan.not_mirrored],
                              post_processed=[s.detail for s in plan.post])
        (tmp / ORIGIN_FILE).write_text(origin.model_dump_json(indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a server in a container must read it too
        if target.exists():
            check_twin_target(target)  # again: the forge took a while, and the directory is not ours to lock
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _headers(directory: Path) -> dict[str, TensorMeta]:
    out: dict[str, TensorMeta] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(read_header(path))
    return out


def _layout_delta(want: dict[str, TensorMeta], got: dict[str, TensorMeta]) -> str:
    missing = sorted(set(want) - set(got))[:3]
    extra = sorted(set(got) - set(want))[:3]
    changed = [f"{n}: {want[n].dtype}{list(want[n].shape)} != {got[n].dtype}{list(got[n].shape)}"
               for n in sorted(set(want) & set(got)) if want[n] != got[n]][:3]
    return f"missing {missing}, unexpected {extra}, changed {changed}"


_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, _TORCH[code])


def post_process(directory: Path, plan: Plan) -> None:
    """Rewrite the forged safetensors to the source's names and dtypes where the forge cannot:
    quantized layouts its `quantize:` / fp8_blocks options do not express (FP8 blocks that end in a
    partial block, per-channel FP8 scales, scales in a dtype the method does not write,
    compressed-tensors packs), per-tensor dtypes, tensors of non-float dtypes, tensors the class
    writes but the source lacks. All into one model.safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    if not plan.post:
        return
    for step in plan.post:
        if step.op == "architectures":  # config.json only; the tensors are the other steps'
            path = directory / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": step.names}, indent=2))
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict = {}
    for path in files:
        tensors.update(load_file(path))
    gen = torch.Generator().manual_seed(plan.spec.seed + 3)
    for target in plan.quant:
        if not target.forge:
            tensors.update(_quantize(target, tensors.pop(target.prefix + ".weight"), gen))
    for step in plan.post:
        for name in step.names:
            if step.op == "cast":
                tensors[name] = tensors[name].to(_torch_dtype(plan.twin[name].dtype))
            elif step.op == "add":
                tensors[name] = _fill(name.rpartition(".")[2], plan.twin[name], gen, {}, None)
            elif step.op == "drop":
                tensors.pop(name, None)
    for path in files:
        path.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})


def _quantize(t: QuantTarget, weight, gen) -> dict:
    """The twin's float weight in the target's layout: FP8 weights really quantized (a partial last
    block padded, as DeepSeek's checkpoints do), packed integer / FP4 tensors random bits, scales
    small and positive, and every dtype the source's."""
    out = {}
    leaves = t.leaves
    if leaves.get("weight") and leaves["weight"].dtype == "F8_E4M3":
        scale_leaf = next((leaf for leaf in ("weight_scale_inv", "weight_scale") if leaf in leaves), None)
        q, scale = _fp8(weight.float(), t, scale_leaf)
        out[f"{t.prefix}.weight"] = q
        if scale_leaf:
            out[f"{t.prefix}.{scale_leaf}"] = scale.to(_torch_dtype(leaves[scale_leaf].dtype))
    for leaf, meta in leaves.items():
        name = f"{t.prefix}.{leaf}"
        if name not in out:
            out[name] = _fill(leaf, meta, gen, t.values, t.params)
    for name, value in out.items():
        assert tuple(value.shape) == leaves[name.rpartition(".")[2]].shape, name
    return {k: v.contiguous() for k, v in out.items()}


def _fp8(weight, t: QuantTarget, scale_leaf: str | None):
    import torch

    if scale_leaf == "weight_scale_inv":
        bn, bk = t.params["block_n"], t.params["block_k"]
        n, k = weight.shape
        padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
        padded[:n, :k] = weight
        q, scale = fp8_block_quantize(padded, [bn, bk])
        return q[:n, :k].contiguous(), scale
    shape = t.leaves[scale_leaf].shape if scale_leaf else ()
    per_row = len(shape) >= 1 and shape[0] == t.out and t.out > 1
    amax = weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(shape)


def _fill(leaf: str, meta: TensorMeta, gen, values: dict, params: dict | None):
    import torch

    dtype = _torch_dtype(meta.dtype)
    if leaf in values:
        return torch.tensor(values[leaf], dtype=dtype).reshape(meta.shape)
    if leaf in rules()["index_leaves"] and meta.shape:  # a position buffer: 0..P-1 along its last dim
        return torch.arange(meta.shape[-1]).expand(meta.shape).to(dtype).contiguous()
    if leaf == "g_idx" and params:  # the act-order index: input channel -> its group
        return (torch.arange(meta.shape[0]) // params["group"]).to(dtype)
    if meta.dtype in {"I32", "I64", "I16", "I8", "U8"}:  # packed quantized values: any bits are valid
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, meta.shape, generator=gen, dtype=torch.int64).to(dtype)
    if meta.dtype.startswith("F8") or meta.dtype == "BOOL":
        return torch.ones(meta.shape).to(dtype)
    if len(meta.shape) == 0 or all(d == 1 for d in meta.shape):  # per-tensor scales
        return torch.ones(meta.shape, dtype=dtype)
    return (torch.rand(meta.shape, generator=gen) * 0.01 + 1e-3).to(dtype)  # group scales, plain extras
