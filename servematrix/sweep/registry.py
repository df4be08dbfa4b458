"""Which architectures a release registers, and which of them can be forged here.

The release is asked itself, in a subprocess of its own interpreter (its registry, not this
process's vLLM, decides what it claims to support): `ModelRegistry.get_supported_archs()` and, for
each architecture, the registry table it sits in (text generation, multimodal, pooling,
speculative decoding, Transformers backend). Reading the tables imports no model module; asking
the registry per architecture (`is_multimodal_model`, …) would inspect each in a subprocess.

Each architecture is then matched, in this process, to the transformers model_type whose
configuration class exists (CONFIG_MAPPING) and whose auto maps list a class of that name, and
classified: forgeable (the mirror forges a model_type's causal-LM class; for a pooling
architecture, transformers' class of its own name: sweep/pooling.py; for a multimodal one, the
composite data/sweep-multimodal.yaml describes: sweep/multimodal.py), or not checkable here with
the reason. Nothing is dropped: every registered architecture gets one Arch.
"""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache

from pydantic import BaseModel

from servematrix.errors import StateError
from servematrix.sweep import drafts, multimodal, native, pooling, wrappers

# Run in the release's interpreter: stdlib and vLLM only; one JSON line on stdout.
PROBE = r"""
import json, sys
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models import registry as r
tables = {"text": "_TEXT_GENERATION_MODELS", "multimodal": "_MULTIMODAL_MODELS",
          "speculative": "_SPECULATIVE_DECODING_MODELS", "transformers-backend": "_TRANSFORMERS_BACKEND_MODELS",
          "transformers-supported": "_TRANSFORMERS_SUPPORTED_MODELS",
          "embedding": "_EMBEDDING_MODELS", "classification": "_SEQUENCE_CLASSIFICATION_MODELS",
          "token-classification": "_TOKEN_CLASSIFICATION_MODELS", "reward": "_REWARD_MODELS",
          "late-interaction": "_LATE_INTERACTION_MODELS"}
out = {}
for arch in ModelRegistry.get_supported_archs():
    kind = next((k for k, t in tables.items() if arch in getattr(r, t, {})), "other")
    entry = getattr(r, tables.get(kind, ""), {}).get(arch) if kind != "other" else None
    out[arch] = {"kind": kind, "vllm_class": entry[1] if isinstance(entry, tuple) and len(entry) > 1 else None}
print("SERVEMATRIX_REGISTRY " + json.dumps(out))
"""

PROBE_TIMEOUT = 600.0  # s: vLLM's imports alone are ~7 s here, minutes on a loaded host

# Why a registered architecture is not a sweep cell, by the registry table vLLM lists it in (a
# speculative draft's reason is sweep/drafts.py's, per draft: data/sweep-drafts.yaml).
KIND_REASONS = {
    # a multimodal architecture's reason is sweep/multimodal.py's (data/sweep-multimodal.yaml describes the
    # composites it forges); this one stands where that module is not asked
    "multimodal": "multimodal: needs an image/audio processor and a vision or audio tower forged as "
                  "data/sweep-multimodal.yaml describes",
    "other": "in no registry table the sweep knows (out-of-tree or previously supported)",
}


# the tables whose architectures are generative models the mirror may forge: vLLM's own classes,
# and the ones it serves through its Transformers backend (the load check then builds that backend)
GENERATIVE = ("text", "transformers-supported")


class Arch(BaseModel):
    """One registered architecture and what the sweep can do with it."""

    arch: str
    kind: str  # the registry table: text, multimodal, speculative, embedding, …
    model_type: str | None = None  # the transformers model_type matched to it
    forgeable: bool = False
    reason: str | None = None  # why not, when not forgeable

    @property
    def pooling(self) -> bool:
        return pooling.is_pooling(self.kind)

    @property
    def draft(self) -> bool:
        """A speculative-decoding draft the sweep checks beside its target (sweep/drafts.py)."""
        return self.kind == "speculative" and self.forgeable

    @property
    def wrapper(self) -> bool:
        """A Transformers-backend wrapper checked through another architecture's twin (sweep/wrappers.py)."""
        return self.kind == "transformers-backend" and self.forgeable

    @property
    def native(self) -> bool:
        """An architecture transformers has no class for, checked from vLLM's own class (sweep/native.py)."""
        return self.kind in GENERATIVE and self.forgeable and native.is_native(self.arch)

    @property
    def key(self) -> str:
        """The cell ids' first part: the model_type of a forgeable generative architecture, else
        its name (model_types are lower snake case, class names CamelCase: the two never collide).
        A pooling architecture shares its model_type with the family's generative one (Qwen2Model,
        Qwen2ForCausalLM: qwen2), so its cells and its twin go by its own name; so do a draft's
        (DeepSeekMTPModel: its target's model_type is deepseek_v3)."""
        own = not (self.pooling or self.draft or self.wrapper or self.native)
        return self.model_type if self.forgeable and self.model_type and own else self.arch


def probe(python: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    """The release's registered architectures: name -> {kind, vllm_class}."""
    import os

    try:
        out = subprocess.run([python, "-P", "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                             env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StateError(python, f"cannot ask its vLLM for the model registry: {exc}") from None
    for line in out.stdout.splitlines():
        if line.startswith("SERVEMATRIX_REGISTRY "):
            return json.loads(line.split(" ", 1)[1])
    tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-1:])
    raise StateError(python, f"its vLLM did not list its model registry (exit {out.returncode}): {tail[:300]}")


def warm() -> None:
    """This process's transformers maps the classification reads (importing transformers and
    every configuration module: seconds), built ahead: run while the releases list their
    registries in their own interpreters (sweep/runner.py), the two overlap."""
    transformers_classes()
    composite_types()


@lru_cache(maxsize=1)
def transformers_classes() -> tuple[dict[str, list[str]], dict[str, str], frozenset[str], str]:
    """From this transformers: class name -> the model_types whose auto maps list it, model_type
    -> its causal-LM class, the model_types with a configuration class, and the version."""
    by_class, causal, configs, version = _auto_maps()
    return by_class, causal, configs, version


@lru_cache(maxsize=1)
def composite_types() -> frozenset[str]:
    """The model_types whose configuration class wraps a text sub-config (`text_config`): Llama 4's,
    Qwen3.5's. Their causal-LM class is also their `*_text` model_type's, and the text one is what a
    text-only checkpoint of that class carries."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = set()
    for model_type in CONFIG_MAPPING.keys():
        try:
            if "text_config" in (getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}):
                out.add(model_type)
        except Exception:  # noqa: BLE001 - a configuration module that does not import here is no composite we use
            continue
    return frozenset(out)


def _auto_maps() -> tuple[dict[str, list[str]], dict[str, str], frozenset[str], str]:
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    by_class: dict[str, list[str]] = {}
    for name in dir(modeling_auto):
        table = getattr(modeling_auto, name)
        if not (name.endswith("_MAPPING_NAMES") and isinstance(table, dict)):
            continue
        for model_type, classes in table.items():
            for cls in (classes,) if isinstance(classes, str) else classes:
                types = by_class.setdefault(cls, [])
                if model_type not in types:
                    types.append(model_type)
    causal = {k: v if isinstance(v, str) else v[0] for k, v in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    return by_class, causal, frozenset(CONFIG_MAPPING_NAMES), transformers.__version__


def classify(arch: str, kind: str) -> Arch:
    """Forgeable, or not checkable here with the reason (first rule that applies)."""
    if pooling.is_pooling(kind):
        model_type, why = pooling.match(arch)
        return Arch(arch=arch, kind=kind, model_type=model_type, forgeable=why is None, reason=why)
    if kind == "speculative":  # an MTP draft the data describes: checked beside its target's twin
        target, why = drafts.match(arch)
        return Arch(arch=arch, kind=kind, model_type=target, forgeable=why is None, reason=why)
    if kind == "transformers-backend":  # checked through an architecture that uses it (data/sweep-wrappers.yaml)
        through, why = wrappers.match(arch)
        return Arch(arch=arch, kind=kind, model_type=through, forgeable=why is None, reason=why)
    if kind == "multimodal":  # a composite the data describes (sweep/multimodal.py): keyed by its model_type
        model_type, why = multimodal.match(arch)
        return Arch(arch=arch, kind=kind, model_type=model_type, forgeable=why is None, reason=why)
    if kind not in GENERATIVE:
        return Arch(arch=arch, kind=kind, reason=KIND_REASONS.get(kind, KIND_REASONS["other"]))
    by_class, causal, configs, version = transformers_classes()
    types = [t for t in by_class.get(arch, []) if t in configs]
    if not types:
        fam = native.family(arch)
        if fam is not None:  # data/sweep-native.yaml: a twin from vLLM's own class (sweep/native.py)
            return Arch(arch=arch, kind=kind, model_type=fam.model_type, forgeable=True)
        return Arch(arch=arch, kind=kind, reason=f"transformers {version} has no class {arch} (remote code only, "
                                                 "or a name only vLLM uses)")
    exact = [t for t in types if causal.get(t) == arch]
    if not exact:
        other = ", ".join(f"{t}: {causal.get(t) or 'none'}" for t in types)
        return Arch(arch=arch, kind=kind, model_type=types[0],
                    reason=f"the mirror forges a model_type's causal-LM class, and that is another class here ({other})")
    # a composite wrapper's causal-LM class is its text model_type's too (Llama4ForCausalLM: llama4 and
    # llama4_text): the text one first. GPT2LMHeadModel is gpt2's and gpt-sw3's: then the model_type
    # the class is named after
    composite = composite_types() if len(exact) > 1 else frozenset()
    exact.sort(key=lambda t: (t in composite, not arch.lower().startswith(t.replace("_", "").replace("-", "")), t))
    return Arch(arch=arch, kind=kind, model_type=exact[0], forgeable=True)


def architectures(registered: dict[str, dict]) -> list[Arch]:
    """Every registered architecture, classified, in name order. Of several forgeable generative
    architectures with one model_type (vLLM aliases) the first keeps it; the others say so. A
    pooling architecture is its own cell (its key is its name), whatever its model_type."""
    out: list[Arch] = []
    taken: dict[str, str] = {}
    for arch in sorted(registered):
        a = classify(arch, registered[arch].get("kind", "other"))
        if a.forgeable and a.key == a.model_type and a.model_type in taken:
            a = a.model_copy(update={"forgeable": False, "reason": f"the same model_type ({a.model_type}) as "
                                                                    f"{taken[a.model_type]}, which is swept"})
        elif a.forgeable and a.key == a.model_type:  # pooling and draft architectures are keyed by name
            taken[a.model_type] = arch
        out.append(a)
    return out
