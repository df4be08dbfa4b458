"""Edits of a forged checkpoint's safetensors after transformers wrote them: tensors renamed or
added, weights stored as FP8 blocks or in a `quantize:` method's layout, deliberate defects (mutations), each file saved with its
index kept in step.

Separate from forge.py, which builds the model and its config: these steps only read and rewrite
tensor files; how each layout packs values is quant_pack.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from servematrix.config.forge_spec import ForgeSpec, Mutation
from servematrix.checkpoint.quant_pack import fp8_block_quantize, quantize_linear


def rename_tensors(out: Path, rename) -> None:
    from safetensors.torch import load_file

    for path in sorted(out.glob("*.safetensors")):
        tensors = {rename(k): v for k, v in load_file(path).items()}
        save_tensors(out, path, tensors)


def tensor_names(out: Path) -> list[str]:
    """The names of the checkpoint's tensors in `out` (headers only)."""
    from safetensors import safe_open

    names: list[str] = []
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names += f.keys()
    return names


def _layers(out: Path) -> int:
    return int(json.loads((out / "config.json").read_text())["num_hidden_layers"])


def add_tensors(out: Path, spec: ForgeSpec) -> None:
    import torch
    from safetensors.torch import load_file

    if not spec.extra_tensors:
        return
    path = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(spec.seed + 2)
    for extra in spec.extra_tensors:
        layers = range(_layers(out)) if "{layer}" in extra.name else [None]
        for i in layers:
            name = extra.name.replace("{layer}", str(i))
            dtype = getattr(torch, extra.dtype)
            if extra.arange:
                tensors[name] = torch.arange(extra.shape[-1]).expand(extra.shape).to(dtype).contiguous()
            elif extra.random:
                tensors[name] = (torch.randn(extra.shape, generator=gen) * spec.init_std).to(dtype)
            else:
                tensors[name] = torch.full(extra.shape, extra.value, dtype=dtype)
    save_tensors(out, path, tensors)


def quantize_fp8_blocks(out: Path, spec: ForgeSpec) -> None:
    import fnmatch

    from safetensors.torch import load_file

    if not spec.fp8_blocks:
        return
    matched: set[str] = set()
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        hits = {name: q for q in spec.fp8_blocks for name in tensors if fnmatch.fnmatchcase(name, q.tensors)}
        for name, q in hits.items():
            if not name.endswith(".weight"):
                raise ValueError(f"fp8_blocks: {name} is not a weight")
            tensors[name], tensors[f"{name}_scale_inv"] = fp8_block_quantize(tensors[name], q.block)
            matched.add(q.tensors)
        if hits:
            save_tensors(out, path, tensors)
    for q in spec.fp8_blocks:
        if q.tensors not in matched:
            raise ValueError(f"fp8_blocks: no tensor matches {q.tensors!r}")


def quantize_weights(out: Path, quantize: list, dtype: str) -> None:
    """A spec's `quantize:` entries on the checkpoint in `out` (a model of `dtype`; a forged one, or a
    sweep's native twin: sweep/native.py): every weight a method selects rewritten in its layout
    (quant_pack.py), then the KV-cache scales added for every layer; a glob that selects nothing, or a
    weight its layout cannot hold, is refused naming the spec entry."""
    import torch
    from safetensors.torch import load_file

    from servematrix.config.quantize import KvCacheScales, layer_pattern, modules

    methods = [(i, q) for i, q in enumerate(quantize) if not isinstance(q, KvCacheScales)]
    hit: set[int] = set()
    files = sorted(out.glob("*.safetensors"))
    for path in files:
        tensors = load_file(path)
        chosen = {name: (i, q) for name in tensors for i, q in methods if q.selects(name)}
        for name, (i, q) in chosen.items():
            weight = tensors[name]
            bad = (f"{weight.dim()}-D" if weight.dim() != 2 else "not a float weight"
                   if not weight.dtype.is_floating_point else q.misaligned(*weight.shape))
            if bad:
                raise ValueError(f"quantize[{i}] ({q.method}): {name} {list(weight.shape)}: {bad}")
            prefix = name[: -len(".weight")]
            leaves = quantize_linear(q, tensors.pop(name), dtype)
            tensors.update({f"{prefix}.{leaf}": t for leaf, t in leaves.items()})
            hit.add(i)
        if chosen:
            save_tensors(out, path, tensors)
    for i, q in methods:
        if i not in hit:
            raise ValueError(f"quantize[{i}] ({q.method}): no weight matches {q.tensors} (ignore {q.ignore})")
    for kv in (q for q in quantize if isinstance(q, KvCacheScales)):
        held = modules(tensor_names(out))  # at any depth: a scale may sit on k_proj or on self_attn itself
        tensors = load_file(files[0])
        written = 0
        for template in (kv.k_scale, kv.v_scale):
            # the layers that hold the scale's module: a hybrid's linear-attention or Mamba layers have no KV
            # cache, and real checkpoints carry the scales on their attention layers only
            module = re.compile(layer_pattern(template.rsplit(".", 1)[0]))
            for layer in sorted({int(m.group(1)) for h in held if (m := module.fullmatch(h))}):
                tensors[template.replace("{layer}", str(layer))] = torch.tensor(kv.value, dtype=torch.float32)
                written += 1
        if not written:
            raise ValueError(f"kv_cache_scales: no layer holds {kv.k_scale.rsplit('.', 1)[0]} to carry the scales")
        save_tensors(out, files[0], tensors)


def mutate(out: Path, m: Mutation) -> None:
    import torch
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    for path in files:
        tensors = load_file(path)
        if m.op == "add" and path == files[0]:
            tensors[m.tensor] = torch.ones(m.shape or [], dtype=torch.float32)
        elif m.tensor not in tensors:
            continue
        elif m.op == "rename":
            tensors[m.to or m.tensor] = tensors.pop(m.tensor)
        elif m.op == "drop":
            tensors.pop(m.tensor)
        elif m.op == "reshape":
            tensors[m.tensor] = torch.zeros(m.shape or [1], dtype=tensors[m.tensor].dtype)
        save_tensors(out, path, tensors)
        return
    if m.op != "add":
        raise ValueError(f"mutation {m.op}: tensor {m.tensor!r} is not in the forged checkpoint")


def save_tensors(out: Path, path: Path, tensors: dict) -> None:
    """Write one safetensors file of the checkpoint back, keeping its index in step."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    _fix_index(out, tensors.keys(), path.name)


def _fix_index(out: Path, names, filename: str) -> None:
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != filename}
        data["weight_map"].update({n: filename for n in names})
        index.write_text(json.dumps(data, indent=2))
