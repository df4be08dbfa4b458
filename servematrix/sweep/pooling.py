"""Pooling architectures (vLLM's embedding, sequence/token classification, reward and
late-interaction tables) as sweep cells.

A pooling architecture names a transformers class of its own (BertModel,
RobertaForSequenceClassification, GPT2ForSequenceClassification, ...), not its family's causal-LM
class, and shares its model_type with the family's generative architecture (Qwen2Model and
Qwen2ForCausalLM are both qwen2): so its cells are keyed by the architecture's name and its twin is
transformers' class of that name, forged by the mirror from the family's published config (or the
class's defaults) with `architectures` set to it (checkpoint.forge.model_class forges a class of the
config's model_type by its name). What decides the model_type is transformers itself: the class's
own configuration class, where the auto maps list the class under that model_type.

The check that the head is really loaded (`head_loaded`) compares the parameter digests the load
check records per rank with the same digest of the twin's own tensors: a head vLLM built but did
not read from the checkpoint holds other bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

# vLLM's pooling registry tables, as sweep/registry.py's PROBE names their kinds
KINDS = ("embedding", "classification", "token-classification", "reward", "late-interaction")

# a configuration class holding one of these sub-configs is a composite with a vision or audio tower
TOWERS = ("vision_config", "audio_config", "vlm_config")

MULTIMODAL = ("multimodal pooling model: its configuration class holds a vision or audio tower; the mirror "
              "forges text models only (composite sources are refused)")

# vLLM's runner for a pooling checkpoint, as its docs tell users to pass it: without it vLLM picks
# the runner from the architecture, and for the `*Model` names its embedding table maps onto a causal
# LM (LlamaModel, Qwen2Model, MistralModel, Gemma2Model) it picks `generate` unless the checkpoint
# carries a Sentence Transformers pooling config (modules.json), which the twin does not
SERVER_ARGS = ["--runner", "pooling"]

# the pooling tables whose models the serve step serves, and the endpoint it calls: an embedding
# model answers /v1/embeddings (the pipeline's embedding smoke, data/sweep-quants.yaml `serve.embedding`);
# the others answer /classify, /score or /pooling, which the serve step does not call yet
SERVED = {"embedding": "/v1/embeddings"}


def unserved(kind: str) -> str | None:
    """Why a pooling cell of vLLM's `kind` table is not served (None: it is)."""
    if kind in SERVED:
        return None
    return (f"a pooling model of vLLM's {kind} table: the serve step calls {', '.join(SERVED.values())} only "
            "(its /classify, /score or /pooling endpoint is not called yet)")


def is_pooling(kind: str) -> bool:
    return kind in KINDS


def match(arch: str) -> tuple[str | None, str | None]:
    """(model_type, None) where this transformers has the class `arch` and forges it for that
    model_type, or data/sweep-heads.yaml describes it as its family's base model and a head (its
    base's model_type), else (model_type or None, the one-line reason it is not checkable here)."""
    import transformers

    from servematrix.sweep import heads
    from servematrix.sweep.registry import transformers_classes

    by_class, _causal, configs, version = transformers_classes()
    types = [t for t in by_class.get(arch, []) if t in configs]
    cls = getattr(transformers, arch, None) if types else None
    if cls is None and heads.describes(arch):  # a family's base model and a head the data describes
        return heads.model_type(arch), None
    if cls is None:
        return None, f"transformers {version} has no class {arch} (remote code only, or a name only vLLM uses)"
    own = getattr(getattr(cls, "config_class", None), "model_type", None)
    if own not in types:  # an auto map lists it, but its configuration class is another model_type's
        return types[0], (f"transformers' {arch} is configured as {own!r}, which its auto maps do not list it "
                          f"under ({', '.join(types)})")
    if _towers(own):
        return own, MULTIMODAL
    return own, None


def model_type_of(key: str) -> str | None:
    """The model_type of a pooling cell's key (an architecture's name: CamelCase, never a
    model_type), or None where `key` is no transformers class."""
    model_type, _ = match(key)
    return model_type


def _towers(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        subs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    except Exception:  # noqa: BLE001 - a configuration module that does not import here has no towers we build
        return False
    return any(t in subs for t in TOWERS)


def source_config(model_type: str, arch: str, published: dict | None) -> dict:
    """The config.json the twin's source layout is read from: the family's published one where the
    corpus has it, else the configuration class's defaults; `architectures` the pooling class's,
    so transformers' class of that name writes the tensors (a head included)."""
    from transformers import AutoConfig

    from servematrix.mirror.family_config import missing_fields

    if published is not None:
        config = dict(published)
    else:
        config = AutoConfig.for_model(model_type).to_dict()
        config.update(missing_fields(model_type, config))
    config.update(architectures=[arch], model_type=model_type)
    return config


class HeadTensor(BaseModel):
    """One tensor of the twin outside its base model (the pooling head), and what the load check's
    ranks hold for it."""

    name: str  # the twin's tensor name
    param: str | None = None  # vLLM's parameter holding its bytes (vLLM may rename: ModernBERT's head -> pooling)
    loaded: bool = False  # some rank's parameter holds exactly the twin's values
    # False where every element is equal (a LayerNorm's ones, a zero bias): any parameter of that
    # shape matches, so only a parameter of the same name counts, and the match proves less
    distinctive: bool = True


def head_tensors(twin: Path) -> dict[str, tuple[tuple[str, ...], bool]]:
    """The twin's head tensors (outside the base model's prefix, e.g. `bert.`): name -> (its
    digests as the load check writes them, in each dtype vLLM may keep it in (sweep/digests.py);
    whether it is distinctive, i.e. not one value repeated)."""
    import transformers
    from safetensors import safe_open

    from servematrix.sweep import digests, heads

    config = json.loads((twin / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    prefix = heads.prefix(arch) or getattr(getattr(transformers, arch, None), "base_model_prefix", "") or ""
    names: dict[str, Path] = {}
    for path in sorted(twin.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names.update({name: path for name in f.keys()})
    # a base model saved alone (BertModel, Qwen2Model) holds no tensor under its prefix: it has no head
    if not prefix or not any(n.startswith(f"{prefix}.") for n in names):
        return {}
    out = {}
    for name, path in names.items():
        if name.startswith(f"{prefix}."):
            continue
        with safe_open(path, "pt") as f:
            t = f.get_tensor(name)
        out[name] = (digests.of(t), digests.distinctive(t))
    return out


def head_loaded(twin: Path, check_dir: Path) -> list[HeadTensor]:
    """Every head tensor of the twin against the load check's rank results: loaded where a rank's
    parameter holds its values, the parameter of the same name (after vLLM's prefix, e.g.
    `model.`) first, else, for a distinctive tensor, any parameter (vLLM renamed it). At TP>1 a
    sharded head holds a slice: only whole-tensor equality counts as loaded."""
    from servematrix.sweep.digests import recorded

    digests = recorded(check_dir)
    out = []
    for name, (want, distinctive) in head_tensors(twin).items():
        same = [p for p in digests if p == name or p.endswith(f".{name}")]
        hit = next((p for p in same if digests[p] in want), None)
        if hit is None and distinctive:
            hit = next((p for p, d in digests.items() if d in want), None)
        out.append(HeadTensor(name=name, param=hit or (same[0] if same else None), loaded=hit is not None,
                              distinctive=distinctive))
    return out
