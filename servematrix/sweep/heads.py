"""Pooling architectures transformers has no class for, whose published checkpoint is a family's base
model with a head of its own (Qwen2.5-Math-RM's `score` MLP over Qwen2): a sweep cell keyed by the
architecture's name, as every pooling cell, its twin the family's twin (sweep/twins.py, the one its
generative cells load) with the tensors such a checkpoint does not hold dropped (`lm_head.`), the
head's tensors added under the published names, shaped from the twin's own config fields, and
`architectures` set to the class. What each head holds, and where its names were read, is data
(servematrix/data/sweep-heads.yaml); this module only writes it.

vLLM builds the class from the family's config (model_type qwen2: no remote code) and loads the
head through its own loader; the runner's "every parameter filled" rule then holds the head to the
twin's bytes as it holds every other parameter (sweep/filled.py), and pooling.head_loaded names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config import packaged
from servematrix.paths import data_file
from servematrix.sweep import drafts

FILE = data_file("sweep-heads.yaml")
HEAD_FILE = "head.safetensors"  # the head's tensors, beside the base twin's files


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Head(_Strict):
    # the base model's cell key: a model_type (its causal-LM twin), a pooling class (BertModel) or a native
    # twin's architecture (data/sweep-native.yaml: InternLM2ForCausalLM)
    base: str
    prefix: str  # the base model's tensors' first name part in the published checkpoint (`model`, `bert`)
    drop: list[str] = Field(default_factory=list)  # name prefixes of the base twin's tensors the checkpoint lacks
    # put before every kept base tensor's name: a base model saved alone (BertModel) under the wrapper's attribute
    add_prefix: str = ""
    tensors: drafts.Shapes  # name -> shape (ints and the twin's config fields, as drafts' shapes)
    names_from: str  # where the published names and shapes were read


class HeadRules(_Strict):
    heads: dict[str, Head]


def rules() -> HeadRules:
    return packaged.load(FILE, HeadRules)


def describes(arch: str) -> bool:
    return arch in rules().heads


def model_type(arch: str) -> str | None:
    """The model_type of a headed architecture: its base's (a pooling class's own model_type)."""
    from servematrix.sweep import native, pooling

    base = rules().heads[arch].base
    # a native twin's architecture (data/sweep-native.yaml): its family's model_type; model_types are lower case
    return native.model_type(base) or (base if base[:1].islower() else pooling.model_type_of(base))


def prefix(arch: str) -> str | None:
    """The base model's name prefix of a headed twin's class (None: not one of these)."""
    head = rules().heads.get(arch)
    return head.prefix if head else None


def build(key: str, directory: Path, max_pp: int, tps: list[int], align: dict[str, int] | None = None):
    """The architecture `key`'s twin: its base's twin copied without the `drop`ped tensors (the
    others under `add_prefix`), with the head (HEAD_FILE) and the index naming every tensor's file,
    `architectures` set; or the reason there is none."""
    from servematrix.sweep import twins

    head = rules().heads[key]
    base = twins.build(head.base, directory, max_pp, tps, align=align)
    origin = f"{key}: its base {head.base}'s twin with the head vLLM loads (names from {head.names_from})"
    if not base.ok:
        return base.model_copy(update={"architecture": key, "origin": f"{origin}; base: {base.origin}",
                                       "reason": f"its base {head.base} has no twin: {base.reason}"})
    made = with_head(key, base, directory)
    if isinstance(made, str):
        return base.model_copy(update={"architecture": key, "path": None, "origin": f"{origin}; base: {base.origin}",
                                       "reason": f"head: {made}"})
    return made.model_copy(update={"spec": None, "shapes": {}, "target": base, "origin": f"{origin}; base: {base.origin}"})


def with_head(key: str, base, directory: Path, suffix: str = ""):
    """`base` (the base model's twin, float or quantized) with the head of `key` added (`_write`), as a
    twin; or why it could not be made."""
    from servematrix.sweep import pooling

    head = rules().heads[key]
    made = drafts.derived(directory, key + suffix, Path(base.path), key.encode() + head.model_dump_json().encode(),
                          "sweep/heads.py", lambda tmp: _write(Path(base.path), tmp, key, head))
    if isinstance(made, str):
        return made
    return base.model_copy(update={
        "architecture": key, "path": str(made),
        # a pooling base has them; a model_type's twin or a native (causal-LM) twin does not
        "server_args": [*base.server_args, *([] if "--runner" in base.server_args else pooling.SERVER_ARGS)]})


def _write(base: Path, into: Path, key: str, head: Head) -> None:
    """The base twin's files copied into `into` less the dropped tensors (the others under
    `add_prefix`), the head's tensors beside them (random, in the twin's float dtype) and
    `architectures` set."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    drafts.copy_files(base, into)
    for f in base.glob("*.safetensors"):  # each copy rewritten from its original
        with safe_open(str(f), "pt") as src:
            kept = {head.add_prefix + n: src.get_tensor(n) for n in src.keys() if not n.startswith(tuple(head.drop))}
        save_file(kept, str(into / f.name), metadata={"format": "pt"})
    config = json.loads((into / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    dtype = drafts.float_dtype(base)
    tensors = {n: (torch.randn(drafts.shape(dims, config), generator=g) * 0.02).to(dtype)
               for n, dims in head.tensors.items()}
    save_file(tensors, str(into / HEAD_FILE), metadata={"format": "pt"})
    config["architectures"] = [key]
    (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
