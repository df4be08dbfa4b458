"""Read a checkpoint's metadata, never its weights: config, tokenizer files and the safetensors
headers (8-byte little-endian length + JSON), from a local directory, a Hugging Face id (metadata
only) or a transformers model_type (its config class's defaults, the model built on the meta
device). The result is a typed SourceLayout: tensor names with dtype and shape, the quantization
layout, and the structure the plan shrinks (MoE, MLA, DSA, MTP, first-dense layers)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from servematrix.errors import ArgumentError, ConfigError, StateError
from servematrix.mirror.family_config import missing_fields
from servematrix.mirror.layout import (HF_QUANT_FILE, MirrorOrigin, SourceLayout, TensorMeta, TokenizerInfo,
                                       assemble)

SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own bound (safetensors refuses larger headers)
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
              "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
INDEX_FILE, SINGLE_FILE, ORIGIN_FILE = "model.safetensors.index.json", "model.safetensors", "mirror.json"


# ---- safetensors headers ----

def read_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor dtypes and shapes from a safetensors file's header alone: reads 8 + N bytes, so a
    file truncated right after its header (a metadata-only copy) reads the same as the full one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StateError(path, f"not a safetensors file: {len(head)} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER or n > size - 8:
                raise StateError(path, f"corrupt safetensors header: its length field says {n} bytes but the file "
                                       f"holds {size - 8} after it (limit {SAFETENSORS_MAX_HEADER})")
            raw = f.read(n)
    except OSError as exc:
        raise StateError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(path, f"corrupt safetensors header: not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise StateError(path, "corrupt safetensors header: not a JSON object")
    return {name: _tensor_meta(path, name, entry) for name, entry in header.items() if name != "__metadata__"}


def _tensor_meta(path: Path, name: str, entry: Any) -> TensorMeta:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (KeyError, TypeError, ValueError):
        raise StateError(path, f"corrupt safetensors header: tensor {name!r} lacks dtype/shape/data_offsets") from None
    bits = DTYPE_BITS.get(dtype)
    if bits is not None and (end - start) * 8 != math.prod(shape) * bits:
        raise StateError(path, f"corrupt safetensors header: tensor {name!r} {dtype}{list(shape)} spans "
                               f"{end - start} bytes")
    return TensorMeta.model_construct(dtype=dtype, shape=shape)  # validated just above; 100k of them


# ---- sources ----

def read_source(source: str) -> SourceLayout:
    """`source`: a local checkpoint directory, `hf:ORG/NAME[@REV]` or a bare ORG/NAME that is no
    local path, or `model_type:NAME` / a bare transformers model_type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if source.startswith("model_type:"):
        return read_model_type(source.split(":", 1)[1])
    if source.startswith("hf:"):
        repo, _, rev = source[3:].partition("@")
        return read_hf(repo, rev or None)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_local(path)
    if source in CONFIG_MAPPING:
        return read_model_type(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", source):
        repo, _, rev = source.partition("@")
        return read_hf(repo, rev or None)
    raise ArgumentError("SOURCE", f"{source!r} is no checkpoint directory, Hugging Face id (ORG/NAME) or "
                                  "transformers model_type")


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(path, exc.lineno, None, f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, None, None, "not a JSON object")
    return data


def read_local(directory: Path) -> SourceLayout:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise StateError(directory, "no config.json: not a checkpoint directory")
    config = _json_file(directory / "config.json")
    index = directory / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_json_file(index).get("weight_map", {}).values()))
        files = [directory / s for s in shards]
    else:
        files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise StateError(directory, "no *.safetensors files (only safetensors checkpoints are mirrored)")
    tensors = _headers(files)
    quant_file = directory / HF_QUANT_FILE
    origin = directory / ORIGIN_FILE
    return assemble(
        source=str(directory), kind="local", config=config, tensors=tensors, files=[p.name for p in files],
        tokenizer=_tokenizer_info({n: directory / n for n in TOKENIZER_FILES if (directory / n).is_file()}),
        hf_quant=_json_file(quant_file) if quant_file.is_file() else None,
        origin=MirrorOrigin.model_validate_json(origin.read_text()) if origin.is_file() else None)


def _headers(files: list[Path]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for path in files:
        if not path.is_file():
            raise StateError(path, "listed in the safetensors index but missing")
        tensors.update(read_header(path))
    return tensors


def _tokenizer_info(paths: dict[str, Path]) -> TokenizerInfo:
    tok_cfg = _json_file(paths["tokenizer_config.json"]) if "tokenizer_config.json" in paths else {}
    chat = bool(tok_cfg.get("chat_template")) or "chat_template.jinja" in paths or "chat_template.json" in paths
    return TokenizerInfo(files=sorted(paths), tokenizer_class=tok_cfg.get("tokenizer_class"), chat_template=chat)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    # read at call time: constants.HF_HUB_OFFLINE is frozen when huggingface_hub is imported
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def read_hf(repo_id: str, revision: str | None = None) -> SourceLayout:
    """Metadata of a Hugging Face repo: small files with hf_hub_download, the tensor layout from
    the hub's safetensors headers (HfApi.get_safetensors_metadata: HTTP range requests, no weights).
    Offline (HF_HUB_OFFLINE=1) everything resolves from the local HF cache, shard headers read from
    the cached files (which may be metadata-only copies)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = _hf_offline()
    cache_dir = os.environ.get("HF_HUB_CACHE") or None

    def fetch(filename: str, required: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=offline))
        except LocalEntryNotFoundError:  # offline, or online and the hub did not answer
            if required:
                raise StateError(f"hf:{repo_id}", f"{filename} is not in the local Hugging Face cache"
                                                  + ("" if offline else " and the hub could not be reached")) from None
            return None
        except EntryNotFoundError:  # the hub answered: the repo has no such file
            if required:
                raise StateError(f"hf:{repo_id}", f"{filename} is not in the repo") from None
            return None
        except Exception as exc:  # noqa: BLE001 - a hub or network failure of any kind is one line for the user
            raise StateError(f"hf:{repo_id}", f"cannot fetch {filename}: {type(exc).__name__}: {exc}") from None

    config = _json_file(fetch("config.json", required=True))
    tok = {n: p for n in TOKENIZER_FILES if (p := fetch(n)) is not None}
    quant_file = fetch(HF_QUANT_FILE)
    if offline:
        index = fetch(INDEX_FILE)
        shards = sorted(set(_json_file(index)["weight_map"].values())) if index else [SINGLE_FILE]
        tensors = _headers([fetch(s, required=True) for s in shards])
    else:
        try:
            meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
        except Exception as exc:  # noqa: BLE001 - as above
            raise StateError(f"hf:{repo_id}", f"cannot read the safetensors headers: {type(exc).__name__}: {exc}") from None
        shards = sorted(meta.files_metadata)
        tensors = {name: TensorMeta(dtype=info.dtype, shape=tuple(info.shape))
                   for fm in meta.files_metadata.values() for name, info in fm.tensors.items()}
    return assemble(source=f"hf:{repo_id}" + (f"@{revision}" if revision else ""), kind="hf", config=config,
                    tensors=tensors, files=shards, tokenizer=_tokenizer_info(tok),
                    hf_quant=_json_file(quant_file) if quant_file else None)


def causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if arch is None:
        raise ArgumentError("SOURCE", f"transformers has no causal-LM class for model_type {model_type!r}")
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


def read_model_type(model_type: str) -> SourceLayout:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ArgumentError("SOURCE", f"{model_type!r} is not a model_type of this transformers")
    config = AutoConfig.for_model(model_type).to_dict()
    # fields the family's real checkpoints carry that the configuration class has no default for,
    # but vLLM reads (mirror-families.yaml, model_type_config): without them the twin is not the
    # flagship's layout (e.g. DeepSeek-V3 without topk_method: noaux_tc has no router bias in vLLM,
    # MiniMax-M2 without rotary_dim does not build there)
    config.update(missing_fields(model_type, config))
    arch = causal_lm_class(model_type)
    dtype = str(config.get("dtype") or "float32")  # the class's defaults carry none: torch's default
    config.update(architectures=[arch], model_type=model_type)
    try:
        tensors = meta_layout(model_type, {k: v for k, v in config.items() if k not in ("architectures", "model_type")},
                              dtype)
    except Exception as exc:  # noqa: BLE001 - a class that cannot be built from its defaults is the user's to know
        raise ConfigError(f"model_type:{model_type}", None, None, f"transformers' {arch} cannot be built on the meta "
                                                                   f"device from its defaults: {type(exc).__name__}: {exc}") from None
    return assemble(source=f"model_type:{model_type}", kind="model_type", config=config, tensors=tensors)


