"""Edits of a forged checkpoint's safetensors after transformers wrote them: tensors renamed or
added, weights stored as FP8 blocks, deliberate defects (mutations), each file saved with its
index kept in step.

Separate from forge.py, which builds the model and its config: these steps only read and rewrite
tensor files, and fp8_block_quantize is also what the mirror's post-processing quantizes with.
"""

from __future__ import annotations

import json
from pathlib import Path

from servematrix.checkpoint.forge_spec import ForgeSpec, Mutation


def rename_tensors(out: Path, rename) -> None:
    from safetensors.torch import load_file

    for path in sorted(out.glob("*.safetensors")):
        tensors = {rename(k): v for k, v in load_file(path).items()}
        save_tensors(out, path, tensors)


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
            tensors[name] = ((torch.randn(extra.shape, generator=gen) * spec.init_std).to(dtype) if extra.random
                             else torch.full(extra.shape, extra.value, dtype=dtype))
    save_tensors(out, path, tensors)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_block_quantize(weight, block: list[int]):
    """(fp8 weight, float32 scale_inv) with scale_inv[i, j] = amax of block (i, j) / FP8_MAX."""
    import torch

    rows, cols = weight.shape
    br, bc = block
    if rows % br or cols % bc:
        raise ValueError(f"shape {list(weight.shape)} is not a multiple of the {block} FP8 block")
    blocks = weight.float().reshape(rows // br, br, cols // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return q, scale.float()


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
