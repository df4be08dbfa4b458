"""Speculative-decoding drafts as sweep cells: the MTP kind (layers of the target's checkpoint) and
the EAGLE kind (a checkpoint of its own beside the target's).

An MTP draft (DeepSeekMTPModel, Glm4MoeMTPModel, ...) has no checkpoint of its own: its weights are
extra layers of its target's checkpoint, and vLLM builds it from the target's config when the
server is asked for `--speculative-config '{"method": "mtp", ...}'`. So a draft cell is keyed by
the draft architecture's name (as a pooling cell is), its twin is the target's twin with the draft
layers added under the names the family's published checkpoints use (data/sweep-drafts.yaml, each
family with where its names were read), and its load check builds and loads the target and then
the draft, as vLLM's spec-decode proposer does (serve/loadcheck_worker.py `--loadcheck-draft`).

An EAGLE draft (LlamaForCausalLMEagle3, EagleLlamaForCausalLM, ...) is a small checkpoint of its own
(config.json and tensors) that vLLM loads from the directory `--speculative-config '{"method": "eagle3",
"model": DIR, ...}'` names. A layout with `checkpoint: own` describes it: the draft config's fields as the
family's published config has them (`config`), those shrunk to the target twin's numbers under the
twin's own invariants (`from_target`), and its tensors with their shapes and dtypes. Its twin is the
target's twin with that directory (DRAFT_DIR) inside it, so the twin travels whole (a Ray node gets
one directory), and the server arguments name it.

`draft_loaded` then tells from the load check's per-rank digests whether the draft's parameters
hold the twin's draft tensors bit for bit: a draft vLLM built but did not fill from the checkpoint
holds other bytes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from servematrix.config import packaged
from servematrix.config.fields import Regex, shape_templates
from servematrix.mirror.source import INDEX_FILE, ORIGIN_FILE
from servematrix.paths import data_file
from servematrix.sweep import digests, filled

FILE = data_file("sweep-drafts.yaml")  # package data, so a wheel install carries it

# a shape entry: an int, a target config field, a product of ints and fields (K*field,
# num_attention_heads*head_dim) or a sum of such products (MLA's kv_a_proj_with_mqa is
# kv_lora_rank+qk_rope_head_dim rows), optionally divided by an int (vocab_size/4). A field may be a dotted path
# into a nested config (text_config.hidden_size: Gemma 4's assistant draft keeps its decoder's numbers in a
# gemma4_text sub-config, a speculators-format EAGLE-3 draft in transformer_layer_config)
_FIELD = r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*"
_FACTOR = rf"(?:[1-9]\d*|{_FIELD})"
_TERM = rf"{_FACTOR}(?:\*{_FACTOR})*"
_DIM = re.compile(rf"^(?P<sum>{_TERM}(?:\+{_TERM})*)(?:/(?P<div>[1-9]\d*))?$")
Shapes = shape_templates(_DIM, "a target config field, a sum of products of fields and ints, or that over an int")

# the draft's tensors are written to this file of the twin, beside the target's
DRAFT_FILE = "draft.safetensors"
# a draft with a checkpoint of its own (EAGLE): its directory inside the twin, and its tensors' file
DRAFT_DIR = "draft"
OWN_FILE = "model.safetensors"
INDEX = INDEX_FILE
ORIGIN = ORIGIN_FILE  # the mirror's record of a twin's source, copied from the target's

# a draft cell's twin is not served: serving a draft means a speculative server's forward passes
NOT_SERVED = "a speculative draft: the sweep's serve step does not run speculative decoding yet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decoder(_Strict):
    """The draft layer's decoder block under the name prefix `prefix`: the target twin's decoder
    layer `like` (last, first or an index: DeepSeek-V3's MTP layer is a MoE layer like its last
    ones, ERNIE-4.5's a dense one like its first), whole or only its `parts`; or, where the block is
    shaped like no target layer, its own `tensors`."""

    prefix: str  # e.g. "model.layers.{index}." (index: first_index + i) or "mtp.layers.{i}."
    like: Literal["last", "first"] | int | None = None  # None: the last, unless the block lists its own tensors
    # the `like` layer's tensor-name prefixes the block takes -> the draft's names for them; the layer's
    # other tensors are left out. Empty: the whole layer under its own names. LongCat-Flash's target layer
    # is a double one (self_attn.0/1, mlps.0/1, norms .0/.1, a MoE mlp), its MTP block one dense layer; Hy4's
    # draft block has no iHC (hc_*) tensors
    parts: dict[str, str] = Field(default_factory=dict)
    # the block's own leaf names and shapes in target config fields, written in the twin's dtype: MiMo-V2-Flash's
    # MTP block joins its target's sliding-window attention (swa_* fields, the sink) with a dense MLP, and names
    # the norm between them pre_mlp_layernorm, so no target layer has its shapes
    tensors: Shapes | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.tensors is not None and (self.like is not None or self.parts):
            raise ValueError("a decoder block is (parts of) a target layer `like`, or lists its own `tensors`: not both")
        return self


TensorDtype = Literal["float16", "bfloat16", "float32", "int64", "bool"]


class Layout(_Strict):
    """How a family lays its draft out. `checkpoint: target` (MTP): draft layers in the target's
    checkpoint, a decoder block shaped as a target layer plus `tensors`; names are templates: `{i}`
    the draft layer (0, 1, ...), `{index}` the target config's `first_index` plus i; a name with
    neither is one tensor for all draft layers. `checkpoint: own` (EAGLE): a checkpoint directory of
    its own, `config` and `from_target` its config.json, `tensors` every tensor it holds."""

    description: str
    checkpoint: Literal["target", "own"] = "target"
    first_index: str | None = None  # the target config field whose value is draft layer 0's {index}
    decoder: Decoder | None = None  # checkpoint target only
    tensors: Shapes  # name template -> shape
    shared: dict[str, str] = Field(default_factory=dict)  # one of `tensors` -> the target tensor it copies
    # checkpoint own: the draft's config.json, the published fields as published...
    config: dict[str, Any] = Field(default_factory=dict)
    # ... and the fields that take the target twin's numbers: draft field -> a target field (its value
    # as is) or an integer expression of target fields (_DIM: a product, over an int)
    from_target: dict[str, str] = Field(default_factory=dict)
    # tensors whose published dtype is not the float one: name -> dtype (a draft's vocabulary map)
    dtypes: dict[str, TensorDtype] = Field(default_factory=dict)
    # the float tensors' published dtype; None: the target twin's
    dtype: TensorDtype | None = None
    # tensors vLLM's loader skips by design: name -> why (the note says so instead of "not loaded")
    skipped: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.checkpoint == "target" and self.decoder is None:
            raise ValueError("a draft in the target's checkpoint (checkpoint: target) needs its `decoder`")
        if self.checkpoint == "own" and (self.decoder is not None or self.shared or self.first_index):
            raise ValueError("a checkpoint of its own (checkpoint: own) has no decoder, shared or first_index: "
                             "every tensor is in `tensors`")
        if self.checkpoint == "own" and not self.config.get("architectures"):
            raise ValueError("a checkpoint of its own needs the published `architectures` in its config")
        for field, template in self.from_target.items():
            if not _DIM.match(template.replace(" ", "")):
                raise ValueError(f"from_target {field}: {template!r} is no target field or integer expression")
        unknown = (set(self.dtypes) | set(self.skipped)) - set(self.tensors)
        if unknown:
            raise ValueError(f"dtypes/skipped name tensors the layout does not hold: {', '.join(sorted(unknown))}")
        return self

    def names(self, template: str, layers: int, first: int | None) -> list[str]:
        """A template's names over the draft layers (once, where it names no layer)."""
        if "{i}" not in template and "{index}" not in template:
            return [template]
        return [template.format(i=i, index=(first or 0) + i) for i in range(layers)]


class Draft(_Strict):
    target: str  # the target's model_type, or a native target's architecture (data/sweep-native.yaml)
    method: str  # --speculative-config method
    layers_field: str | None = None  # the target config field that counts the draft layers (checkpoint target)
    layout: str
    names_from: str
    layers: int = Field(1, ge=1)  # draft layers the twin carries (published DeepSeek-V3 / GLM-4.5: 1)
    # --speculative-config num_speculative_tokens; None: `layers` (an MTP draft runs each layer once)
    tokens: int | None = Field(None, ge=1)
    # checkpoint own: published config fields of this draft that differ from its layout's `config` (EAGLE-3's
    # official trainer names its draft `LlamaForCausalLM`, which vLLM's EAGLEConfig turns into
    # Eagle3LlamaForCausalLM; SpecForge names it `LlamaForCausalLMEagle3`, kept as it is)
    config: dict[str, Any] = Field(default_factory=dict)
    # further --speculative-config fields a published draft is served with (P-EAGLE's model cards:
    # `"parallel_drafting": true`); method, model and num_speculative_tokens are the fields above
    speculative: dict[str, Any] = Field(default_factory=dict)

    @field_validator("speculative")
    @classmethod
    def _speculative_extra(cls, fields: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(fields) & {"method", "model", "num_speculative_tokens"})
        if clash:
            raise ValueError(f"`speculative` repeats {', '.join(clash)}: `method`/`tokens` say them, and the "
                             "model is the draft's own directory")
        return fields


class NotDescribed(_Strict):
    pattern: Regex
    reason: str


class DraftRules(_Strict):
    layouts: dict[str, Layout]
    drafts: dict[str, Draft]
    not_described: list[NotDescribed]

    @field_validator("drafts")
    @classmethod
    def _layouts_known(cls, drafts: dict[str, Draft], info) -> dict[str, Draft]:
        layouts = (info.data or {}).get("layouts") or {}
        for arch, d in drafts.items():
            if d.layout not in layouts:
                raise ValueError(f"{arch}: layout {d.layout!r} is not one of {', '.join(sorted(layouts))}")
            if layouts[d.layout].checkpoint == "target" and not d.layers_field:
                raise ValueError(f"{arch}: a draft in the target's checkpoint needs `layers_field`")
            if layouts[d.layout].checkpoint == "target" and d.config:
                raise ValueError(f"{arch}: `config` is a checkpoint of its own's (checkpoint: own); this draft's "
                                 "layers are in the target's checkpoint, whose config is the target twin's")
        return drafts


def rules() -> DraftRules:
    return packaged.load(FILE, DraftRules)


def is_draft(key: str) -> bool:
    """Whether a cell key names a draft described in the data (its cells and twin are a draft's)."""
    return key in rules().drafts


def match(arch: str) -> tuple[str | None, str | None]:
    """(target model_type, None) for a draft the data describes, else (None, why it is not
    checkable here: the first `not_described` pattern that matches)."""
    from servematrix.sweep import native

    r = rules()
    if arch in r.drafts:
        target = r.drafts[arch].target  # a model_type, or a native target's architecture: its family's model_type
        return native.model_type(target) or target, None
    why = next((n.reason for n in r.not_described if re.search(n.pattern, arch)), None)
    return None, f"speculative-decoding draft: {why or 'not described in data/sweep-drafts.yaml'}"


def speculative_args(draft: Draft, model: Path | None = None) -> list[str]:
    """The server arguments that make vLLM build `draft` beside its target; `model`: the draft's own
    checkpoint directory (an EAGLE draft), named in the speculative config as a user names it."""
    spec: dict[str, Any] = {"method": draft.method}
    if model is not None:
        spec["model"] = str(model)
    spec["num_speculative_tokens"] = draft.tokens or draft.layers
    spec.update(draft.speculative)
    return ["--speculative-config", json.dumps(spec)]


def shape(dims: list[int | str], config: dict) -> tuple[int, ...]:
    """A data shape in the target twin's config's numbers."""
    return tuple(d if isinstance(d, int) else _number(d, config) for d in dims)


def _number(template: str, config: dict) -> int:
    """An integer expression (_DIM) in `config`'s numbers: a sum of products of ints and fields, over an int."""
    m = _DIM.match(template.replace(" ", ""))
    if not m:
        raise ValueError(f"{template!r} is no target config field or integer expression")
    out = 0
    for term in m["sum"].split("+"):
        product = 1
        for factor in term.split("*"):
            value = int(factor) if factor.isdigit() else _field(config, factor)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"the target's config has no integer {factor!r}")
            product *= value
        out += product
    div = int(m["div"] or 1)
    if out % div:
        raise ValueError(f"{template} is {out}/{div}: not whole")
    return out // div


_MISSING = object()


def _field(config: dict, path: str, missing=None):
    """A config field by its dotted path (text_config.hidden_size: the sub-config's), else `missing`."""
    value = config
    for part in path.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            return missing
    return value


def draft_config(layout: Layout, target_config: dict, published: dict | None = None) -> dict:
    """A checkpoint-of-its-own draft's config.json: the published fields (the layout's, then the
    draft's own `published` ones over them), then the ones that take the target twin's numbers (a
    bare field: its value as is, of any type; else an integer). A draft field may be a dotted path:
    the field of a nested config (a sub-config the published fields hold)."""
    import copy

    out = copy.deepcopy({**layout.config, **(published or {})})  # nested configs are written into: not the data's
    for field, template in layout.from_target.items():
        name = template.replace(" ", "")
        if re.fullmatch(_FIELD, name):
            value = _field(target_config, name, _MISSING)
            if value is _MISSING:
                raise ValueError(f"the target's config has no {name!r} for the draft's {field}")
        else:
            value = _number(name, target_config)
        *parents, leaf = field.split(".")
        into = out
        for part in parents:
            into = into.setdefault(part, {})
            if not isinstance(into, dict):
                raise ValueError(f"the draft's {field}: {part} is no nested config")
        into[leaf] = value
    return out


def own_tensors(layout: Layout, config: dict, float_dtype, seed: int = 0) -> dict:
    """A checkpoint-of-its-own draft's tensors, shapes in the target twin's config's numbers: floats
    with fresh random values in the published dtype (else `float_dtype`, the target twin's), integer
    tensors random 0 and 1 (a vocabulary map's offsets: every draft id's target id stays in the
    vocabulary), booleans random."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    floating = getattr(torch, layout.dtype) if layout.dtype else float_dtype
    out = {}
    for name, dims in layout.tensors.items():
        want = shape(dims, config)
        kind = layout.dtypes.get(name)
        if kind == "bool":
            out[name] = torch.randint(0, 2, want, generator=gen).bool()
        elif kind == "int64":
            out[name] = torch.randint(0, 2, want, generator=gen, dtype=torch.int64)
        else:
            out[name] = (torch.randn(want, generator=gen) * 0.02).to(getattr(torch, kind) if kind else floating)
    return out


def draft_tensors(target: Path, draft: Draft, layout: Layout, seed: int = 0) -> dict:
    """The draft layers' tensors for the target twin at `target`: per draft layer, the decoder block
    (_block) under the decoder prefix, plus the layout's own tensors, in the twin's dtype, with fresh
    random values (so a draft parameter holding one of them can only have read it from this file),
    or copies of the target's where `shared` says so."""
    import torch

    config = json.loads((target / "config.json").read_text())
    first = config.get(layout.first_index) if layout.first_index else None
    if layout.first_index and not isinstance(first, int):
        raise ValueError(f"the target's config has no integer {layout.first_index!r}")
    shapes = _block(target, layout.decoder, config)
    dtype = shapes.get("input_layernorm.weight", next(iter(shapes.values())))[1]
    gen = torch.Generator().manual_seed(seed)
    copies = _target_tensors(target, set(layout.shared.values()))
    out = {}
    for i in range(draft.layers):
        at = layout.decoder.prefix.format(i=i, index=(first or 0) + i)
        for leaf, (dims, dt) in shapes.items():
            out[at + leaf] = (torch.randn(dims, generator=gen) * 0.02).to(dt)
    for template, dims in layout.tensors.items():
        want = shape(dims, config)
        for name in layout.names(template, draft.layers, first):
            if template in layout.shared:
                out[name] = copies[layout.shared[template]].clone()
                if tuple(out[name].shape) != want:
                    raise ValueError(f"{layout.shared[template]} is {tuple(out[name].shape)}, the layout says {want}")
                continue
            out[name] = (torch.randn(want, generator=gen) * 0.02).to(dtype)
    return out


def _block(target: Path, decoder: Decoder, config: dict) -> dict:
    """The draft's decoder block, leaf name -> (shape, dtype): its own `tensors` in the twin's dtype,
    or the target twin's layer `like` (its `parts` only, renamed, where the decoder names them)."""
    if decoder.tensors is not None:
        dtype = float_dtype(target)
        return {leaf: (shape(dims, config), dtype) for leaf, dims in decoder.tensors.items()}
    from safetensors import safe_open

    like, layers = "last" if decoder.like is None else decoder.like, config.get("num_hidden_layers")
    source = like if isinstance(like, int) else (0 if like == "first" else (layers or 0) - 1)
    prefix = f"model.layers.{source}."
    shapes = {}
    for path in sorted(target.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    t = f.get_slice(name)
                    shapes[name[len(prefix):]] = (tuple(t.get_shape()), _dtype(t.get_dtype()))
    if not shapes:
        raise ValueError(f"the target twin has no decoder layer {source} to shape the draft layer as")
    if not decoder.parts:
        return shapes
    missing = [p for p in decoder.parts if not any(leaf.startswith(p) for leaf in shapes)]
    if missing:  # stale data, not an empty block
        raise ValueError(f"the target twin's decoder layer {source} has no {', '.join(missing)}* tensor")
    out = {}
    for leaf, value in shapes.items():
        part = next((p for p in decoder.parts if leaf.startswith(p)), None)
        if part is not None:  # a tensor of the layer the draft's block has no counterpart of is left out
            out[decoder.parts[part] + leaf[len(part):]] = value
    return out


def own_names(key: str, twin: Path) -> set[str]:
    """The names of the draft's own tensors (the layout's, not its decoder layer's) in `twin`."""
    draft, layout = rules().drafts[key], layout_of(key)
    config = json.loads((Path(twin) / "config.json").read_text())
    first = config.get(layout.first_index) if layout.first_index else None
    return {n for t in layout.tensors for n in layout.names(t, draft.layers, first)}


def _target_tensors(target: Path, names: set[str]) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(target.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if n in names})
    missing = names - set(out)
    if missing:
        raise ValueError(f"the target twin has no {', '.join(sorted(missing))} to copy")
    return out


def _dtype(name: str):
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(name, torch.float32)


def build(key: str, directory: Path, max_pp: int, tps: list[int], align: dict[str, int] | None = None):
    """The draft `key`'s twin: its target's twin (sweep/twins.py, the same as the target's cells
    load) copied with the draft layers added (DRAFT_FILE, the index naming every tensor's file) and
    the layer count set in its config, or, for a checkpoint of its own, with the draft's directory
    (DRAFT_DIR: config.json and OWN_FILE) inside it; or the reason there is none."""
    from servematrix.sweep import twins

    r = rules()
    draft = r.drafts[key]
    layout = r.layouts[draft.layout]
    base = twins.build(draft.target, directory, max_pp, tps, align=align)
    origin = (f"draft {key} (--speculative-config method {draft.method}) beside its target {draft.target}'s twin; "
              f"draft names from {draft.names_from}")
    if not base.ok:
        return base.model_copy(update={"architecture": key, "origin": f"{origin}; target: {base.origin}",
                                       "reason": f"its target {draft.target} has no twin: {base.reason}"})
    made = with_draft(key, base, directory)
    if isinstance(made, str):
        return base.model_copy(update={"architecture": key, "path": None, "origin": f"{origin}; target: {base.origin}",
                                       "reason": f"draft layers: {made}"})
    return made.model_copy(update={"spec": None, "shapes": {}, "target": base, "origin": f"{origin}; target: {base.origin}"})


def own_checkpoint(key: str) -> bool:
    """Whether the draft `key` is a checkpoint of its own (EAGLE, EAGLE-3, DFlash, Gemma 4's assistant)."""
    r = rules()
    return r.layouts[r.drafts[key].layout].checkpoint == "own"


def with_draft(key: str, base, directory: Path, suffix: str = ""):
    """`base` (the target's twin, float or quantized) with the draft `key` written in or beside it
    (`_write`), as a twin; or why it could not be made."""
    r = rules()
    draft = r.drafts[key]
    layout = r.layouts[draft.layout]
    made = derived(directory, key + suffix, Path(base.path), draft.model_dump_json().encode()
                   + layout.model_dump_json().encode(), "sweep/drafts.py",
                   lambda tmp: _write(Path(base.path), tmp, draft, layout))
    if isinstance(made, str):
        return made
    return base.model_copy(update={
        "architecture": key, "path": str(made), "draft": draft.method,
        "server_args": [*base.server_args,
                        *speculative_args(draft, made / DRAFT_DIR if layout.checkpoint == "own" else None)],
        "load_only": base.load_only or NOT_SERVED})


def derived(directory: Path, name: str, source: Path, described: bytes, code: str, fill) -> Path | str:
    """A twin directory made from the twin at `source` (a draft's, sweep/heads.py a head's): under
    `directory`, named `name` and a digest of what decides its bytes (the source twin's directory name,
    `described`, the code file `code` that writes it), `fill(tmp)` writing it (`built`); or why it could
    not be made, in one line."""
    import hashlib

    from servematrix.paths import code_digest

    h = hashlib.sha256(source.name.encode())
    h.update(described)
    h.update(code_digest((code,), ()).encode())
    into = directory / f"{name}-{h.hexdigest()[:12]}"
    try:
        built(into, fill)
    except (ValueError, OSError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return into


def _write(base: Path, into: Path, draft: Draft, layout: Layout) -> None:
    """The target twin's files copied into `into`, the draft tensors beside them and the config's
    draft layer count, or the draft's own directory (DRAFT_DIR)."""
    from safetensors.torch import save_file

    copy_files(base, into)
    if layout.checkpoint == "own":  # the draft's own directory; the target's files as they are
        _write_own(base, into / DRAFT_DIR, layout, draft)
    else:
        tensors = draft_tensors(base, draft, layout)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(into / DRAFT_FILE), metadata={"format": "pt"})
        config = json.loads((into / "config.json").read_text())
        config[draft.layers_field] = draft.layers
        (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_files(base: Path, into: Path) -> None:
    """A twin's files (not its index, which `built` writes last) copied into `into`; not copy2: the
    copy's age is its own (the test cache prunes twins by it)."""
    for f in base.iterdir():
        if f.is_file() and f.name != INDEX:
            shutil.copy(f, into / f.name)


def built(target: Path, fill) -> Path:
    """A twin directory made from another twin's files (a draft's; a head's, sweep/heads.py):
    `fill(tmp)` writes them, then the index naming every tensor's file is the marker by which
    paths.build_cached publishes the directory, once and whole. One that exists is reused as it is
    (its origin file touched: the test cache prunes twins by that file's age)."""
    from servematrix.paths import build_cached

    def build(tmp: Path) -> dict:
        fill(tmp)
        return index(tmp)

    if (target / INDEX).is_file() and (target / ORIGIN).is_file():
        (target / ORIGIN).touch()
    return build_cached(target, INDEX, build)


def index(directory: Path) -> dict:
    """The safetensors index of a twin directory: every tensor's file."""
    from safetensors import safe_open

    weight_map = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            weight_map.update({n: path.name for n in f.keys()})
    return {"metadata": {}, "weight_map": weight_map}


def _write_own(base: Path, into: Path, layout: Layout, draft: Draft) -> None:
    """A checkpoint-of-its-own draft's directory: its config.json (published fields, the target
    twin's numbers) and its tensors in OWN_FILE."""
    from safetensors.torch import save_file

    config = draft_config(layout, json.loads((base / "config.json").read_text()), draft.config)
    tensors = own_tensors(layout, config, float_dtype(base))
    into.mkdir()
    (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(into / OWN_FILE), metadata={"format": "pt"})


def float_dtype(base: Path):
    """The target twin's float dtype (its first floating tensor's)."""
    from safetensors import safe_open

    for path in sorted(base.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                kind = f.get_slice(name).get_dtype()
                if kind in ("BF16", "F16", "F32"):
                    return _dtype(kind)
    return _dtype("F32")


def draft_file(twin: Path) -> Path:
    """The file that holds the twin's draft tensors: its own checkpoint's (DRAFT_DIR), else DRAFT_FILE."""
    own = Path(twin) / DRAFT_DIR / OWN_FILE
    return own if own.is_file() else Path(twin) / DRAFT_FILE


class DraftTensor(BaseModel):
    """One of the twin's draft tensors and whether a draft parameter holds it."""

    name: str
    param: str | None = None  # the draft parameter holding its values
    loaded: bool = False
    # not loaded: the target tensor whose values the draft parameter of its name holds instead (vLLM's
    # GLM-4.5 and Hy3 MTP loaders fill the draft's shared head from the target's lm_head)
    instead: str | None = None


def _file_digests(twin: Path, skip: Path | None = None) -> dict[str, tuple[str, ...]]:
    """Every tensor of the twin, its own draft directory's too (less the file `skip`) -> its digests
    (digests.of)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(twin).glob("*.safetensors")) + sorted((Path(twin) / DRAFT_DIR).glob("*.safetensors")):
        if skip is not None and path == skip:
            continue
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                out[name] = digests.of(f.get_tensor(name))
    return out


def draft_loaded(twin: Path, check_dir: Path) -> list[DraftTensor]:
    """Each distinctive tensor of the twin's draft_file against the draft parameters the load
    check's ranks recorded (`draft_digests`): loaded where a draft parameter holds exactly its
    values (vLLM may hold it in the model's dtype: compared in each of digests.DTYPES), the parameter of
    the same name first, else any (vLLM renames the decoder layer's tensors into `mtp_block.` and
    fuses some: a fused or TP-split tensor matches none, so callers compare the whole-tensor ones,
    at TP=1). A tensor vLLM stacks with others (sweep-filled.yaml `stacked`: q, k, v into qkv_proj) is loaded
    where a parameter holds its group concatenated."""
    from safetensors import safe_open

    # a persistent buffer the checkpoint fills counts as holding its tensor (Gemma 4's token_ordering)
    held = {**digests.recorded(check_dir, "draft_buffers"), **digests.recorded(check_dir, "draft_digests")}
    by_digest = {d: n for n, d in held.items()}
    target: dict[str, list[str]] | None = None
    out = []
    source = draft_file(twin)
    with safe_open(str(source), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for name, t in tensors.items():
        if not digests.distinctive(t):
            continue  # one value repeated: any parameter of its shape would match
        want = digests.of(t)
        hit = name if held.get(name) in want else next((by_digest[w] for w in want if w in by_digest), None)
        instead = None
        if hit is None and name in held:
            target = target if target is not None else _file_digests(twin, skip=source)
            instead = next((n for n, ds in target.items() if held[name] in ds), None)
        out.append(DraftTensor(name=name, param=hit, loaded=hit is not None, instead=instead))
    stacked = {}
    for members, whole in filled.stacks(tensors):  # one stacking rule for the drafts and every other cell
        hit = next((by_digest[w] for w in digests.of(whole) if w in by_digest), None)
        stacked.update({m: hit for m in members if hit is not None})
    # a tensor vLLM holds stacked with its group: loaded where the stacked parameter is the group's bytes
    return [t.model_copy(update={"param": stacked[t.name], "loaded": True}) if not t.loaded and t.name in stacked
            else t for t in out]


def shared_known(check_dir: Path) -> bool:
    """Whether the rank that built the draft did the proposer's sharing (a release whose proposer
    shares inline in load_model records `draft_shared: null`)."""
    built = [r for r in digests.ranks(check_dir) if r.get("draft_digests") is not None]
    return bool(built) and all(isinstance(r.get("draft_shared"), dict) for r in built)


def layout_of(key: str) -> Layout:
    r = rules()
    return r.layouts[r.drafts[key].layout]


def note(key: str, twin: Path, check_dir: Path, tp: int) -> str:
    """A draft cell's record in words: the draft architecture vLLM resolved from the twin's config
    (it must be the cell's: else the data names the wrong target or method), the class it built and
    its parameter count on the last PP rank, and at TP=1 how many of the draft's own tensors (the
    layout's, not the decoder layer's, which vLLM fuses) its parameters hold bit for bit, and what
    the others hold instead."""
    built = next((r for r in digests.ranks(check_dir) if r.get("draft_model")), None)
    if built is None:
        return "draft: no rank recorded a draft model"
    resolved = built.get("draft_architecture")
    words = (f"draft: vLLM resolved {resolved}" + ("" if resolved == key else f", NOT {key}: the data's target or "
                                                   "method is wrong for this cell")
             + f", built {built['draft_model']} on rank {built.get('rank')} ({built.get('draft_parameters')} parameters)")
    if tp > 1:
        return words
    own, skipped = own_names(key, twin), layout_of(key).skipped
    found = draft_loaded(twin, check_dir)
    checked = [t for t in found if t.name in own and t.name not in skipped]
    missing = [t.name + (f" (holds the target's {t.instead})" if t.instead else "") for t in checked if not t.loaded]
    # a tensor vLLM's loader skips by design: said so, or named as loaded after all (the data is then wrong)
    passed = [f"{t.name} ({'LOADED after all' if t.loaded else skipped[t.name]})" for t in found if t.name in skipped]
    unread = unread_params(key, twin, check_dir)
    judged = "" if shared_known(check_dir) else ("; draft parameters not judged: this vLLM's proposer shares the "
                                                 "target's embedding/head inline, which the load check does not do")
    return (f"{words}; its own tensors: {len(checked) - len(missing)} of {len(checked)} loaded bit for bit"
            + (f", not: {', '.join(missing)}" if missing else "")
            + (f"; skipped by vLLM's loader by design: {', '.join(passed)}" if passed else "")
            + f"; {sum(t.loaded for t in found)} of the twin's {len(found)} draft tensors found in its parameters"
            + (f"; draft parameters holding no tensor of the twin: {', '.join(unread)}" if unread else "") + judged)


def unread_params(key: str, twin: Path, check_dir: Path) -> list[str]:
    """The draft's parameters that hold no tensor, stack or vLLM transform of the twin (its draft
    directory included) after the proposer's sharing (the load check's `draft_shared`): vLLM built
    them and did not fill them (at TP=1, where every such parameter is whole), as filled.unfilled
    decides it for a target's parameters. [] where the load check could not do the sharing
    (`shared_known`): what the server would hold is then not known, so nothing is judged."""
    from servematrix.sweep import filled

    if not shared_known(check_dir):
        return []
    own = draft_file(twin).parent
    return filled.unfilled([key, rules().drafts[key].target], twin, check_dir, ("draft_digests", "draft_shared"),
                           also=(own,) if own != Path(twin) else ())
