"""Read a checkpoint's metadata, never its weights: config, tokenizer files and the safetensors
headers (8-byte little-endian length + JSON), from a local directory, a Hugging Face id (metadata
only) or a transformers model_type (its config class's defaults, the model built on the meta
device). The result is a typed SourceLayout: tensor names with dtype and shape, the quantization
layout, and the structure the plan shrinks (MoE, MLA, DSA, MTP, first-dense layers)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from servematrix.errors import ArgumentError, ConfigError, StateError
from servematrix.mirror.family_config import missing_fields
from servematrix.mirror.inputs import (DTYPE_BITS, SAFETENSORS_MAX_HEADER, read_config, read_header, read_hf_quant,
                                       read_index, read_origin, read_tokenizer_config, validate_config)
from servematrix.mirror.layout import (HF_QUANT_FILE, MirrorOrigin, SourceLayout, TensorMeta, TokenizerInfo,
                                       assemble)

__all__ = ["DTYPE_BITS", "ORIGIN_FILE", "SAFETENSORS_MAX_HEADER", "causal_lm_class", "check_twin_target",
           "config_layout", "meta_layout", "read_header", "read_hf", "read_local", "read_model_type", "read_source"]

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
INDEX_FILE, SINGLE_FILE, ORIGIN_FILE, CONFIG_FILE = ("model.safetensors.index.json", "model.safetensors", "mirror.json",
                                                     "config.json")
SOURCE_FORMS = ("a checkpoint directory, its config.json, hf:ORG/NAME (read from the local Hugging Face cache; "
                "hub ids are never fetched) or model_type:NAME")


# ---- sources ----

def read_source(source: str, argument: str = "SOURCE") -> SourceLayout:
    """`source`: a local checkpoint directory (safetensors headers, or config.json alone and its
    index), a config.json file, `hf:ORG/NAME[@REV]` from the local HF cache, or `model_type:NAME`
    / a bare transformers model_type. `argument` is the command-line argument it came from, named
    by every refusal of its form (SOURCE, or --diff's TWIN)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if source.startswith("model_type:"):
        return read_model_type(source.split(":", 1)[1], argument)
    if source.startswith("hf:"):
        repo, _, rev = source[3:].partition("@")
        # a revision names a ref or commit inside the cache: never a path that climbs out of it
        if (not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", repo) or ".." in repo
                or (rev and (not re.fullmatch(r"[\w./-]{1,128}", rev) or ".." in rev))):
            raise ArgumentError(argument, f"{source!r}: a Hugging Face id is hf:ORG/NAME[@REV]")
        return read_hf(repo, rev or None)
    path = Path(source).expanduser()
    kind = _path_kind(path, argument, source)
    if kind == "dir":
        return read_local(path)
    if kind == "other":  # a FIFO, socket or device: opening one may block, reading it means nothing
        raise ArgumentError(argument, f"{source!r} is neither a regular file nor a directory")
    if kind == "file":
        if path.suffix != ".json":
            raise ArgumentError(argument, f"{source!r} is a file, not {SOURCE_FORMS}")
        return read_config_only(path, _sibling_index(path))
    if source in CONFIG_MAPPING:
        return read_model_type(source, argument)
    # nothing is fetched from a hub at run time: an ORG/NAME that is no local path is a typo or an
    # id the user must name as hf: (cache only); either way one line now, not minutes of retries
    raise ArgumentError(argument, f"{source!r}: no such file or directory (a source is {SOURCE_FORMS})")


def _path_kind(path: Path, argument: str, source: str) -> str | None:
    try:
        if path.is_dir():
            return "dir"
        if path.exists():
            return "file" if path.is_file() else "other"
        return None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of links
        raise ArgumentError(argument, f"{source[:200]!r}: not a usable path ({getattr(exc, 'strerror', None) or exc})") from None


def _sibling_index(config: Path) -> Path | None:
    index = config.parent / INDEX_FILE
    return index if index.is_file() else None


def read_local(directory: Path) -> SourceLayout:
    """A checkpoint directory: config.json, the tokenizer files, and the tensor layout from the
    safetensors headers; where the directory holds no shard at all, config.json alone (and the
    index's names, if an index is there) as read_config_only does."""
    directory = Path(directory)
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise StateError(config if config.exists() else directory,
                         "is not a regular file" if config.exists() else "no config.json: not a checkpoint directory")
    index = directory / INDEX_FILE
    if index.is_file():
        shards = sorted(set(read_index(index).weight_map.values()))
        files = [directory / s for s in shards]
        if shards and not any(f.is_file() for f in files):  # an index without its shards: names only
            return read_config_only(directory / CONFIG_FILE, index, str(directory))
    else:
        files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("consolidated"))
        if not files:
            return read_config_only(directory / CONFIG_FILE, None, str(directory))
    config = read_config(directory / CONFIG_FILE)
    require_roles(directory / CONFIG_FILE, config)
    tensors = _headers(files)
    quant_file = directory / HF_QUANT_FILE
    origin = directory / ORIGIN_FILE
    return assemble(
        source=str(directory), kind="local", config=config, tensors=tensors, files=[p.name for p in files],
        tokenizer=_tokenizer_info({n: directory / n for n in TOKENIZER_FILES if (directory / n).is_file()}),
        hf_quant=read_hf_quant(quant_file) if quant_file.is_file() else None,
        origin=read_origin(origin) if origin.is_file() else None)


def read_config_only(config_path: Path, index: Path | None, source: str | None = None) -> SourceLayout:
    """A config.json without safetensors headers: config_layout on the file's config, kept to
    the names the index's weight map lists where an index is given (a name the index lists that
    the class does not build has no dtype or shape without its shard's header: refused, naming it),
    with the tokenizer files beside it."""
    directory = config_path.parent
    weight_map = read_index(index).weight_map if index is not None else None
    layout = config_layout(read_config(config_path), source or str(config_path), where=config_path,
                           tokenizer=_tokenizer_info({n: directory / n for n in TOKENIZER_FILES
                                                      if (directory / n).is_file()}))
    if weight_map is None:
        return layout
    unknown = [n for n in weight_map if n not in layout.tensors]
    if unknown:
        raise ConfigError(index, None, "weight_map", f"{len(unknown)} tensor(s) transformers' "
                                                     f"{layout.architectures[0]} does not build, e.g. {unknown[0]!r}: "
                                                     "their dtypes and shapes are only in the shards' safetensors "
                                                     "headers (put the shards, or copies cut after their headers, "
                                                     "beside the index)")
    # what the checkpoint really stores (a tied lm_head, a buffer the class saves but it does not)
    tensors = {n: m for n, m in layout.tensors.items() if n in weight_map}
    return assemble(source=layout.source, kind="local", config=layout.config, tensors=tensors, files=[],
                    tokenizer=layout.tokenizer)


def config_layout(config: dict[str, Any], source: str, where: Path | str | None = None,
                  tokenizer: TokenizerInfo | None = None, drop: tuple[str, ...] = ()) -> SourceLayout:
    """The SourceLayout of a checkpoint known by its config.json alone (a dict, typed here as
    config.json is): the tensors transformers' class for its model_type writes at the config's
    full size on the meta device — the path a model_type:NAME source takes, with the config's
    values instead of the class's defaults. `where` names the config in every refusal. `drop`:
    config fields left out (the sweep's unquantized twins of a published config drop
    `quantization_config`: a config alone has no quantized tensors). The CLI's config.json source
    and the sweep's published-config corpus (sweep/corpus.py) both come through here."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = where or source
    config = validate_config({k: v for k, v in config.items() if k not in drop}, where)
    require_roles(where, config)
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(where, None, "model_type", f"{model_type!r} has no transformers configuration class "
                                                     "here: without safetensors headers the tensor layout comes "
                                                     "from that class (give the shards' headers)")
    dtype = _config_dtype(config, where)
    _bounded_build(config, where)
    arch = (config.get("architectures") or [None])[0] or causal_lm_class(model_type)
    tensors = class_layout(model_type, {**config, **missing_fields(model_type, config)}, arch, dtype, where,
                           "this config")
    return assemble(source=source, kind="local", config=config, tensors=tensors, files=[], tokenizer=tokenizer)


def class_layout(model_type: str, config: dict[str, Any], arch: str, dtype: str, where: Path | str,
                 what: str) -> dict[str, TensorMeta]:
    """The layout transformers' class for `model_type` writes for `config` at full size (meta
    device): a model_type:NAME source's (the class's defaults) and a config-only source's."""
    build = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map",
                                                          "quantization_config", "torch_dtype", "dtype")}
    # the class's own defaults are left to it: a strict configuration class refuses some keys its
    # own to_dict() writes (DBRX: `Found unknown kwargs={'_name_or_path': '', 'output_attentions': False}`)
    defaults = _class_defaults(model_type)
    build = {k: v for k, v in build.items() if k not in defaults or defaults[k] != v}
    try:
        return meta_layout(model_type, {**build, "architectures": [arch]}, dtype)
    except Exception as exc:  # noqa: BLE001 - the class refuses the values: the user's to know, in one line
        raise ConfigError(where, None, None, f"transformers' {arch} cannot be built on the meta device from "
                                             f"{what}: {type(exc).__name__}: {_one(exc)}") from None


def _class_defaults(model_type: str) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).to_dict()
    except Exception:  # noqa: BLE001 - a class without usable defaults: every given key is passed
        return {}


def _bounded_build(config: dict[str, Any], path: Path | str) -> None:
    """Without headers the layout is built module by module: layers x experts bounded (each is
    bounded alone by inputs.config_model), so no config can make the build run for minutes."""
    from servematrix.mirror.inputs import MODULES_MAX
    from servematrix.mirror.layout import field_value

    layers_key, layers = field_value(config, "layers")
    experts_key, experts = field_value(config, "experts")
    if layers_key and isinstance(experts, int) and experts > 1 and layers * experts > MODULES_MAX:
        raise ConfigError(path, None, f"{layers_key} x {experts_key}",
                          f"got {layers} x {experts} = {layers * experts:,}; accepted: at most {MODULES_MAX:,} "
                          "(the layout of a config without safetensors headers is built layer by layer, expert by "
                          "expert; published MoE checkpoints have ~25k)")


def _config_dtype(config: dict, path: Path | str) -> str:
    value = config.get("torch_dtype") or config.get("dtype") or "float32"
    if value not in ("float32", "bfloat16", "float16"):
        key = "torch_dtype" if config.get("torch_dtype") else "dtype"
        raise ConfigError(path, None, key, f"got {value!r}; accepted: float32, bfloat16 or float16 (the dtype the "
                                           "layout is built in without safetensors headers)")
    return value


# every plan reads these two (the layers it keeps, the width the others follow); heads are not
# required: an attention-free family (Mamba) has none and is planned
REQUIRED_ROLES = ("layers", "hidden")


def require_roles(where: Path | str, config: dict[str, Any]) -> None:
    """The config (with its class's defaults under it) must carry the fields every plan reads, in a
    spelling mirror-families.yaml's `fields` lists: a family that spells them otherwise (gpt2's
    n_layer / n_embd / n_head) is refused here, naming them, not met by a crash in the plan."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from servematrix.mirror.layout import field_value, rules

    cls = CONFIG_MAPPING[config["model_type"]] if config.get("model_type") in CONFIG_MAPPING else None
    try:
        defaults = cls().to_dict() if cls is not None else {}
    except Exception:  # noqa: BLE001 - a class without usable defaults: the config alone is judged
        defaults = {}
    merged = {**defaults, **config}
    for role in REQUIRED_ROLES:
        if field_value(merged, role)[1] is None:
            spellings = rules()["fields"][role]
            alias = {v: k for k, v in (getattr(cls, "attribute_map", None) or {}).items()}
            theirs = [a for a, canon in alias.items() if canon in spellings]
            raise ConfigError(where, None, "/".join(spellings),
                              f"missing: the mirror reads the {role} as {' or '.join(spellings)}"
                              + (f"; model_type {config.get('model_type')!r} spells it {theirs[0]}, which "
                                 "mirror-families.yaml's fields do not list (not mirrored yet)" if theirs else ""))


def _one(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _headers(files: list[Path]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for path in files:
        if not path.is_file():  # a FIFO here would block the read of its header forever
            raise StateError(path, "is not a regular file (a directory, FIFO or device)" if path.exists()
                             else "listed in the safetensors index but missing")
        tensors.update(read_header(path))
    return tensors


def _tokenizer_info(paths: dict[str, Path]) -> TokenizerInfo:
    tok = read_tokenizer_config(paths["tokenizer_config.json"]) if "tokenizer_config.json" in paths else None
    chat = bool(tok and tok.chat_template) or "chat_template.jinja" in paths or "chat_template.json" in paths
    return TokenizerInfo(files=sorted(paths), tokenizer_class=tok.tokenizer_class if tok else None, chat_template=chat)


def read_hf(repo_id: str, revision: str | None = None) -> SourceLayout:
    """Metadata of a Hugging Face repo from the local HF cache only (HF_HUB_CACHE, or the default):
    config and tokenizer files, and the shards' headers from the cached files (which may be
    metadata-only copies). Nothing is fetched: a run that waits on a hub is a run that hangs."""
    from huggingface_hub import hf_hub_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    where = f"hf:{repo_id}" + (f"@{revision}" if revision else "")

    def cached(filename: str, required: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - not cached (or a damaged cache): the same line for the user
            if required:
                raise StateError(where, f"{filename} is not in the local Hugging Face cache"
                                        f"{'' if type(exc).__name__.endswith('NotFoundError') else ' (' + type(exc).__name__ + ')'}"
                                        "; hub ids are never fetched: download the metadata first") from None
            return None

    config_path = cached(CONFIG_FILE, required=True)
    config = read_config(config_path)
    require_roles(where, config)
    tok = {n: p for n in TOKENIZER_FILES if (p := cached(n)) is not None}
    quant_file = cached(HF_QUANT_FILE)
    index = cached(INDEX_FILE)
    shards = sorted(set(read_index(index).weight_map.values())) if index else [SINGLE_FILE]
    tensors = _headers([cached(s, required=True) for s in shards])
    return assemble(source=where, kind="hf", config=config, tensors=tensors, files=shards,
                    tokenizer=_tokenizer_info(tok), hf_quant=read_hf_quant(quant_file) if quant_file else None)


# ---- the twin directory: what may be replaced ----

# what a twin directory holds (the forge's files, mirror.json, post-processed shards): anything
# else in it is someone's, and a directory holding it is not replaced
TWIN_FILE_RE = re.compile(r"^(config|generation_config|forge|mirror|tokenizer|tokenizer_config|special_tokens_map|"
                          r"added_tokens|chat_template|hf_quant_config|vocab|preprocessor_config)\.json$|"
                          r"^(tokenizer\.model|merges\.txt|vocab\.txt|chat_template\.jinja)$|"
                          r"^[\w.-]+\.safetensors$|^model\.safetensors\.index\.json$|^configuration_\w+\.py$")


def check_twin_target(target: Path | str, keep: list[Path | str] = ()) -> None:
    """Refuse, before anything is written, a --checkpoint directory that mirror may not replace.
    Replaced only: nothing there, an empty directory, or a directory that is a twin mirror wrote —
    a mirror.json that reads as one and nothing but a twin's files. Never a symlink, a file, the
    working directory or one above it, or a directory that holds a path in `keep` (the scenario
    file being written)."""
    target = Path(target)
    absolute = Path(os.path.abspath(target))
    if target.is_symlink():
        raise StateError(target, "is a symbolic link: mirror writes a twin directory only in place of one of its own")
    if not target.exists():
        return
    if not target.is_dir():
        raise StateError(target, "exists and is not a directory: not replaced")
    cwd = Path(os.getcwd())
    if absolute == cwd or absolute in cwd.parents:
        raise StateError(target, "is the working directory or holds it: a twin is written into a directory of its own")
    for path in keep:
        p = Path(os.path.abspath(path))
        if p == absolute or absolute in p.parents:
            raise StateError(target, f"would be replaced by the twin but holds {path}: choose another --checkpoint")
    try:
        entries = sorted(os.scandir(target), key=lambda e: e.name)
    except OSError as exc:
        raise StateError(target, f"cannot be read: {exc.strerror or exc}") from None
    if not entries:
        return
    names = {e.name for e in entries}
    if ORIGIN_FILE not in names:
        raise StateError(target, "exists and is not a twin written by mirror (no mirror.json): not replaced")
    foreign = [e.name for e in entries if e.is_symlink() or not e.is_file(follow_symlinks=False)
               or not TWIN_FILE_RE.match(e.name)]
    if foreign:
        raise StateError(target, f"holds {len(foreign)} file(s) a twin does not, e.g. {foreign[0]!r}: not a twin mirror "
                                 "wrote, not replaced")
    try:
        read_origin(target / ORIGIN_FILE)
    except (ConfigError, StateError) as exc:
        raise StateError(target, f"its mirror.json is not one mirror wrote ({exc}): not replaced") from None


def causal_lm_class(model_type: str, argument: str = "SOURCE") -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if arch is None:
        raise ArgumentError(argument, f"transformers has no causal-LM class for model_type {model_type!r}")
    return arch


def meta_layout(model_type: str, config: dict[str, Any], dtype: str) -> dict[str, TensorMeta]:
    """The checkpoint transformers' own class writes for `config`, built on the meta device (no
    memory): save_pretrained's names (its weight conversions reverted, e.g. fused experts back to
    experts.<e>.w1), dtypes and full-size shapes. The class is the forge's for the config's
    architecture (checkpoint.forge.model_class): its causal-LM class, or an encoder's own."""
    import torch
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from servematrix.checkpoint.forge import build_model, model_class

    cfg = AutoConfig.for_model(model_type, **config)
    cls = model_class(model_type, (config.get("architectures") or [""])[0])
    with torch.device("meta"):
        model = build_model(cls, cfg, getattr(torch, dtype))
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    return {name: TensorMeta(dtype=_st_dtype(t.dtype), shape=tuple(t.shape)) for name, t in state.items()}


def _st_dtype(dtype) -> str:
    import torch

    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]


def read_model_type(model_type: str, argument: str = "SOURCE") -> SourceLayout:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ArgumentError(argument, f"{model_type[:100]!r} is not a model_type of this transformers")
    try:
        config = AutoConfig.for_model(model_type).to_dict()
    except Exception as exc:  # noqa: BLE001 - a configuration class without usable defaults
        raise ArgumentError(argument, f"model_type:{model_type}: transformers' configuration class has no usable "
                                      f"defaults: {type(exc).__name__}: {_one(exc)}") from None
    # fields the family's real checkpoints carry that the configuration class has no default for,
    # but vLLM reads (mirror-families.yaml, model_type_config): without them the twin is not the
    # flagship's layout (e.g. DeepSeek-V3 without topk_method: noaux_tc has no router bias in vLLM,
    # MiniMax-M2 without rotary_dim does not build there)
    config.update(missing_fields(model_type, config))
    arch = causal_lm_class(model_type, argument)  # first: an encoder-decoder or vision type is no LM at all
    require_roles(f"model_type:{model_type}", {**config, "model_type": model_type})
    dtype = str(config.get("dtype") or "float32")  # the class's defaults carry none: torch's default
    config.update(architectures=[arch], model_type=model_type)
    tensors = class_layout(model_type, config, arch, dtype, f"model_type:{model_type}", "its defaults")
    return assemble(source=f"model_type:{model_type}", kind="model_type", config=config, tensors=tensors)
