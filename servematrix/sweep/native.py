"""Native twins: architectures vLLM registers that transformers has no class for (remote code only,
or a name only vLLM uses), checked from a published config and the tensor layout vLLM's own model
class expects (data/sweep-native.yaml lists them, each config with where it was read).

The mirror cannot forge these: its forge writes a checkpoint through transformers' class for the
model_type (mirror/plan.py _resolve_class: "has no transformers class here: the forge cannot write
its tensors"). A native twin is built without one:

1. the family's config (published fields, verbatim) is shrunk under the invariants every sweep twin
   keeps (layers >= the largest PP; heads, KV heads and experts split by every TP): the fields the
   mirror's role table (mirror-families.yaml `fields`) names, plus the family's own `twin` values
   from the data for fields no role covers (per-layer lists);
2. vLLM's class for the architecture is built from that config on the meta device, in the
   release's interpreter (serve/native_probe.py), and its parameters are turned back into
   checkpoint names and shapes by inverting the class's own loading rules (hf_to_vllm_mapper,
   packed_modules_mapping, each experts layer's get_expert_mapping);
3. those tensors are written with random bf16 values beside the forge's tokenizer.

A model_type neither transformers nor vLLM has a configuration class for is read by the load check
as a plain PretrainedConfig (loadcheck_worker --loadcheck-config-type): the json's fields as
attributes, nothing derived; what the model reads and the json lacks is in the load check's
recorded misses, as for every twin.

What this proves, and what not: the names come from vLLM's own class, so a native twin checks that
vLLM builds and loads (every layout, every parameter filled at TP=1) a checkpoint shaped as vLLM
expects it; it cannot catch vLLM expecting a name the real checkpoints do not carry. Where a
published weight map is in the data (`weight_map_names`), the twin's names are compared with it
(`compare`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config import packaged
from servematrix.config.quantize import layer_pattern
from servematrix.paths import data_file

FILE = data_file("sweep-native.yaml")
PROBE = Path(__file__).resolve().parent.parent / "serve" / "native_probe.py"
PROBE_TIMEOUT = 600.0
MARK = "NATIVE_LAYOUT "
DONE_FILE = "native.json"  # written last: a twin directory holding it is complete
STACKS = "stacks"  # in DONE_FILE: the checkpoint tensors vLLM stacks into one parameter (sweep/filled.py reads it)

# the twin's sizes (each a whole multiple of what every TP in the sweep splits)
HEAD_DIM = 16
FFN = 128
MOE_FFN = 64
EXPERTS_PER_TP = 2
TOP_K = 2

# spellings of the vocabulary size (ChatGLM's padded_vocab_size is the one its class reads)
VOCAB_KEYS = ("vocab_size", "padded_vocab_size")

# config fields a twin never carries from the published config
DROPPED = ("auto_map", "quantization_config", "_name_or_path", "transformers_version", "_commit_hash")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NativeFamily(_Strict):
    arch: str  # the architecture vLLM registers (its cells' key)
    model_type: str
    origin: Literal["published", "vllm-config-defaults", "transformers-config-defaults"]
    hub: str | None = None  # the Hugging Face repo that publishes the config
    found: str  # where the config's values were read (index id, vLLM or transformers source file)
    complete: bool  # False: a subset of the published fields, verbatim
    note: str | None = None
    config: dict[str, Any]  # the published fields, verbatim (JSON spellings)
    twin: dict[str, Any] = Field(default_factory=dict)  # the twin's values for fields no role covers
    # the remote configuration class's attribute_map (attribute -> config.json field): the one thing a
    # plain PretrainedConfig cannot know; with where it was read
    aliases: dict[str, str] = Field(default_factory=dict)
    aliases_found: str | None = None
    # a derived name -> the published spelling, where vLLM accepts both and the derivation cannot tell which
    # the checkpoints carry (a mapper rule that drops a submodule); each with its reason in the data. `{layer}`
    # in a name stands for any layer's index (the same in both names), so a rule holds at every twin depth
    renames: dict[str, str] = Field(default_factory=dict)
    weight_map_names: list[str] = Field(default_factory=list)  # published names of layer 0 and the rest, if known
    weight_map_found: str | None = None
    # why the derivation cannot give this family's checkpoint names (its cells are "not checkable here" with it)
    unsupported: str | None = None
    # the architectures entry as the published config spells it, where that is not the name vLLM registers (the
    # twin states the registered one: its cells check vLLM's class; the note says a checkpoint so spelled
    # names an architecture vLLM's registry does not list)
    published_as: str | None = None


class NativeRules(_Strict):
    families: list[NativeFamily]


def rules() -> NativeRules:
    return packaged.load(FILE, NativeRules)


def family(arch: str) -> NativeFamily | None:
    return next((f for f in rules().families if f.arch == arch), None)


def renamed(fam: NativeFamily, name: str) -> str:
    """`name` as the family's `renames` spell it (an exact rule first, then a `{layer}` template)."""
    if name in fam.renames:
        return fam.renames[name]
    for derived, published in fam.renames.items():
        if "{layer}" in derived and (m := re.fullmatch(layer_pattern(derived), name)):
            return published.replace("{layer}", m.group(1))
    return name


def is_native(key: str) -> bool:
    return family(key) is not None


def model_type(key: str) -> str | None:
    """The model_type of the native family keyed `key` (None: no family of that name). Data that names a
    target or base by its architecture (a draft's target, a head's base) resolves through it."""
    fam = family(key)
    return fam.model_type if fam is not None else None


def label(fam: NativeFamily) -> str:
    what = {"published": f"the published config {fam.hub} ({'complete' if fam.complete else 'partial copy'})",
            "vllm-config-defaults": "vLLM's own configuration class defaults",
            "transformers-config-defaults": "transformers' configuration class defaults"}[fam.origin]
    spelled = (f"; the published config names the architecture {fam.published_as}, a name vLLM's registry does not "
               f"list (it lists {fam.arch}, the class checked here), so vLLM does not resolve such a checkpoint to it"
               if fam.published_as else "")
    return (f"native twin from {what}, read at {fam.found}; tensor names from vLLM's {fam.arch} on the meta device"
            + spelled)


# ---- the twin's config ----

def _roles() -> dict[str, list[str]]:
    from servematrix.mirror.layout import rules as mirror_rules

    fields = mirror_rules()["fields"]
    return {k: v for k, v in fields.items() if isinstance(v, list) and all(isinstance(x, str) for x in v)}


def source_config(fam: NativeFamily) -> dict[str, Any]:
    """The family's config: the data's fields, over transformers' class defaults for an origin of
    `transformers-config-defaults` (a class transformers has under another name than vLLM's)."""
    if fam.origin != "transformers-config-defaults":
        return dict(fam.config)
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(fam.model_type).to_dict()
    return {**{k: v for k, v in defaults.items() if k not in ("architectures", "id2label", "label2id")},
            **fam.config}


class Widths(NamedTuple):
    """The twin's widths: a head's, the dense and the experts' feed-forward. A family's `twin` values
    may name them (`"{head_dim}"`, `"{ffn}"`, `"{moe_ffn}"`: a field no role covers that is one of them)."""

    head_dim: int = HEAD_DIM
    ffn: int = FFN
    moe_ffn: int = MOE_FFN


def widths(tps: list[int], align: dict[str, int] | None = None) -> Widths:
    """The twin's widths; with `align` (sweep/rules.py Widen.units: a quantized layout's block or group,
    outputs and inputs, per TP rank) the smallest multiples of the defaults whose every TP shard holds
    whole units, as real checkpoints' do: a rank's query heads (2 a rank at the largest TP, as
    twin_config plans them) in the attention's outputs and the output projection's inputs, one KV head a
    rank, the hidden size (every linear's input or output), each feed-forward width's shard."""
    if not align:
        return Widths()
    top = max(tps)

    def whole(width: int, unit: str) -> bool:
        return width % align.get(unit, 1) == 0

    def head_fits(hd: int) -> bool:
        return all(whole(2 * top // tp * hd, "attn_out") and whole(2 * top // tp * hd, "attn_in") for tp in tps) \
            and whole(hd, "kv_out") and whole(2 * top * hd, "all")

    def ffn(base: int) -> int:
        return next(w for w in range(base, 64 * base + 1, base)
                    if all(w % tp == 0 and whole(w // tp, "ffn") and whole(w, "all") for tp in tps))

    head_dim = next(hd for hd in range(HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM) if head_fits(hd))
    return Widths(head_dim, ffn(FFN), ffn(MOE_FFN))


def _twin_values(fam: NativeFamily, w: Widths) -> dict[str, Any]:
    named = {f"{{{k}}}": v for k, v in w._asdict().items()}
    return {k: named.get(v, v) if isinstance(v, str) else v for k, v in fam.twin.items()}


def twin_config(fam: NativeFamily, max_pp: int, tps: list[int], vocab: int | None = None,
                special: dict[str, int] | None = None, w: Widths = Widths()) -> dict[str, Any]:
    """The family's config shrunk: every role field it carries set to the twin's size (`w`), then the
    family's own `twin` values (data), then the forge-owned fields (vocabulary, special tokens)."""
    roles = _roles()
    cfg = {k: v for k, v in source_config(fam).items() if k not in DROPPED}
    tp = max(tps)
    heads = 2 * tp
    published_heads = next((cfg[k] for k in roles["heads"] if isinstance(cfg.get(k), int)), None)
    published_kv = next((cfg[k] for k in roles["kv_heads"] if isinstance(cfg.get(k), int)), None)
    grouped = published_kv is not None and published_heads is not None and published_kv < published_heads
    kv = tp if grouped else heads
    experts = EXPERTS_PER_TP * tp

    def put(role: str, value: Any, only_int: bool = True) -> None:
        for key in roles.get(role, []):
            if key in cfg and (not only_int or isinstance(cfg[key], int)) and not isinstance(cfg[key], bool):
                cfg[key] = value

    put("layers", max(2, max_pp))
    put("hidden", heads * w.head_dim)
    put("heads", heads)
    put("kv_heads", kv)
    put("head_dim", w.head_dim)
    for key in roles.get("ffn", []):
        if isinstance(cfg.get(key), int):
            cfg[key] = w.ffn if key == "intermediate_size" else w.moe_ffn
    put("experts", experts)
    for key in roles.get("top_k", []):
        if isinstance(cfg.get(key), int):
            cfg[key] = min(cfg[key], TOP_K)
    put("n_group", 1)
    put("topk_group", 1)
    for key in roles.get("shared_experts", []) + roles.get("first_dense", []):
        if isinstance(cfg.get(key), int):
            cfg[key] = min(cfg[key], 1)
    cfg.update(_twin_values(fam, w))
    cfg["architectures"] = [fam.arch]
    cfg["model_type"] = fam.model_type
    cfg["torch_dtype"] = "bfloat16"
    if vocab is not None:  # the forge's tokenizer's (forge-owned, as in every twin), in each spelling carried
        for key in VOCAB_KEYS:
            if key in cfg or key == "vocab_size":
                cfg[key] = vocab
    cfg.update(special or {})
    return cfg


# ---- the layout vLLM expects ----

def layout(config_dir: Path, python: str, config_types: list[str], env: dict[str, str] | None = None) -> dict:
    """serve/native_probe.py's answer for the config in `config_dir`: {tensors, unmapped, class,
    config_class} or {error}."""
    argv = [python, "-P", str(PROBE), str(config_dir), "--dtype", "bfloat16",
            *[f"--config-type={t}" for t in config_types]]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                             env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"native probe: {type(exc).__name__}: {exc}"}
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-1:])
    return {"error": f"native probe exited {out.returncode} without an answer: {tail[:300]}"}


def needs_plain_config(model_type: str) -> bool:
    """Neither transformers nor (by its own data) vLLM has a configuration class for it: the
    probe and the load check read it as a plain PretrainedConfig (the worker skips a type vLLM has)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type not in CONFIG_MAPPING


def compare(fam: NativeFamily, names: list[str]) -> list[str]:
    """Published names (layer 0 and the rest, data `weight_map_names`) the twin lacks, and the
    twin's names of the same layers the published map lacks."""
    if not fam.weight_map_names:
        return []
    import re

    def kept(n: str) -> bool:
        m = re.search(r"\.layers\.(\d+)\.", n) or re.search(r"\.h\.(\d+)\.", n)
        return m is None or m.group(1) == "0"

    ours = {n for n in names if kept(n)}
    theirs = set(fam.weight_map_names)
    return [f"published, not in the twin: {n}" for n in sorted(theirs - ours)] + \
           [f"in the twin, not published: {n}" for n in sorted(ours - theirs)]


# ---- the twin ----

def build(key: str, directory: Path, max_pp: int, tps: list[int], align: dict[str, int] | None = None):
    """The native twin of architecture `key` in `directory` (content-addressed: reused when complete),
    or the reason there is none; its layout is the current release's class's (the runner checks its
    cells on that release only). `align`: widened for a quantized layout (widths)."""
    from servematrix.sweep.twins import Twin

    fam = family(key)
    if fam is None:
        return Twin(model_type=key, architecture=key, origin="no twin", reason=f"no native family {key}")
    origin = label(fam)
    if fam.unsupported:
        return Twin(model_type=fam.model_type, architecture=key, origin=origin,
                    reason=f"native twin: {fam.unsupported}")
    try:
        return _build(fam, directory, max_pp, tps, origin, widths(tps, align))
    except Exception as exc:  # noqa: BLE001 - a family that cannot be built costs its cells, not the sweep
        text = " ".join(str(exc).split())[:400]
        return Twin(model_type=fam.model_type, architecture=key, origin=origin,
                    reason=f"native twin: {type(exc).__name__}: {text}")


class _NoLayout(Exception):
    """vLLM's class gave no checkpoint layout for the twin's config (the reason its cells are not checkable)."""


def _build(fam: NativeFamily, directory: Path, max_pp: int, tps: list[int], origin: str, w: Widths):
    # the forge's own tokenizer, as every forged twin carries it (its helpers are private to forge.py, whose
    # bytes key the forge cache: not moved here)
    from servematrix.checkpoint.forge import _pin_tokenizer_class, _train_tokenizer
    from servematrix.config.forge_spec import TokenizerSpec
    from servematrix.paths import build_cached
    from servematrix.serve import envs
    from servematrix.sweep.twins import Twin

    python = envs.python(envs.CURRENT)
    aliases = ",".join(f"{k}={v}" for k, v in sorted(fam.aliases.items()))
    plain = [f"{fam.model_type}:{aliases}" if aliases else fam.model_type] if needs_plain_config(fam.model_type) else []
    tokenizer = _train_tokenizer(TokenizerSpec())
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = twin_config(fam, max_pp, tps, len(tokenizer), special, w)
    h = hashlib.sha256(json.dumps([config, fam.model_dump(mode="json")], sort_keys=True).encode())
    for part in (Path(__file__), PROBE, PROBE.with_name("loadcheck_worker.py")):
        h.update(part.read_bytes())
    target = directory / f"{fam.arch}-{h.hexdigest()[:12]}"
    done = target / DONE_FILE
    server_args = ["--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "8", "--dtype", "bfloat16"]

    def build(tmp: Path) -> dict:  # the marker's content: what the probe found
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        found = layout(tmp, python, plain, envs.launch_env(envs.CURRENT))
        if "error" in found:
            raise _NoLayout(f"vLLM's {fam.arch} on the meta device: {found['error'][:400]}")
        if found.get("unmapped"):
            first = next(iter(found["unmapped"].items()))
            raise _NoLayout(f"no checkpoint name for {len(found['unmapped'])} of vLLM's parameters, "
                            f"e.g. {first[0]}: {first[1]}")
        tensors = {renamed(fam, n): shape for n, shape in found["tensors"].items()}
        _write_tensors(tmp, tensors, fam.arch)
        tokenizer.save_pretrained(tmp)
        _pin_tokenizer_class(tmp)
        return {"family": fam.model_dump(mode="json"), "class": found.get("class"),
                "config_class": found.get("config_class"), "plain_config_types": found.get("plain_config_types", plain),
                "tensors": tensors, STACKS: [[renamed(fam, n) for n in g] for g in found.get("stacks") or []],
                "weight_map_differences": compare(fam, list(tensors))}

    try:
        build_cached(target, DONE_FILE, build, touch=True)  # the test cache prunes twins by their marker's age
    except _NoLayout as exc:
        return Twin(model_type=fam.model_type, architecture=fam.arch, origin=origin, reason=str(exc))
    record = json.loads(done.read_text())
    notes = [origin]
    if record.get("weight_map_differences"):
        notes.append(f"differs from the published weight map: {'; '.join(record['weight_map_differences'][:4])}")
    elif fam.weight_map_names:
        notes.append(f"layer-0 names match the published weight map ({fam.weight_map_found})")
    plain_types = record.get("plain_config_types") or []
    # a server reads config.json through AutoConfig, which knows no class for these without remote code: the
    # load check registers a plain one in its ranks, a server process does not (yet)
    load_only = (f"the server has no configuration class for model_type {fam.model_type} without remote code "
                 "(only the load check reads it as a plain PretrainedConfig)") if plain_types else None
    return Twin(model_type=fam.model_type, architecture=fam.arch, path=str(target), server_args=server_args,
                load_only=load_only, origin="; ".join(notes), config_types=plain_types,
                shapes={n: tuple(s) for n, s in record["tensors"].items()})


def _write_tensors(directory: Path, tensors: dict[str, list[int]], arch: str) -> None:
    """Random bf16 values (seeded by the architecture: the same twin has the same bytes)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16))
    out = {}
    for name in sorted(tensors):
        shape = tensors[name]
        out[name] = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16).contiguous()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})


def recorded_stacks(twin: Path) -> list[list[str]]:
    """The stacks a native twin's probe derived from vLLM's class (empty for any other twin)."""
    try:
        return json.loads((Path(twin) / DONE_FILE).read_text()).get(STACKS) or []
    except (OSError, ValueError):
        return []


# ---- its quantized variants ----

QUANT_DONE_FILE = "native-quantized.json"


def quantized(base, fields: dict[str, Any], quant: str) -> Path | str:
    """`base` (a native twin) in `quant`'s layout: sweep/quant.py layout()'s `fields` (the ForgeSpec
    fields it sets) applied to a copy of its tensors by the forge's own writer (forge_tensors.py
    quantize_weights: real FP8 values and scales, AWQ/GPTQ packs, KV-cache scales, from the twin's
    weights), the quantization_config they imply in its config.json; the path, or why there is none."""
    from pydantic import TypeAdapter

    from servematrix.checkpoint.forge_tensors import quantize_weights, tensor_names
    from servematrix.config.quantize import QuantizeSpec, quantization_config
    from servematrix.paths import build_cached, code_digest
    from servematrix.sweep.drafts import copy_files

    if "quantize" not in fields or set(fields) - {"quantize", "dtype"}:
        return f"{quant}: a native twin takes a `quantize:` layout only, not {sorted(set(fields) - {'dtype'})}"
    entries = TypeAdapter(list[QuantizeSpec]).validate_python(fields["quantize"])
    dtype = fields.get("dtype") or "bfloat16"  # a native twin is written in bf16 (_write_tensors)
    source = Path(base.path)
    h = hashlib.sha256(json.dumps([source.name, fields], sort_keys=True).encode())
    h.update(code_digest(("sweep/native.py", "checkpoint/forge_tensors.py", "checkpoint/quant_pack.py",
                          "config/quantize.py"), ("torch", "safetensors")).encode())

    def build(tmp: Path) -> dict:
        import torch
        from safetensors.torch import load_file, save_file

        copy_files(source, tmp)  # the twin's files; its tensors are written again below
        want = getattr(torch, dtype)
        tensors = {k: v.to(want) if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        quantize_weights(tmp, entries, dtype)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(entries, tensor_names(tmp))
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return {"base": source.name, "quant": quant, "fields": fields}

    target = source.parent / f"{source.name}-{quant}-{h.hexdigest()[:12]}"
    try:
        build_cached(target, QUANT_DONE_FILE, build, touch=True)  # the test cache prunes twins by their marker's age
    except ValueError as exc:  # the writer's refusal (a weight its layout cannot hold): the reason
        return f"{quant}: the forge's writer refuses the native twin: {' '.join(str(exc).split())[:300]}"
    return target
