"""Forge tiny random-weight checkpoints that mirror a real architecture.

A forged checkpoint has the real family's config fields, tensor names and dtypes (it is written by
transformers' own model class for that family) but random weights and a tokenizer trained here
on the gsm8k text, so nothing comes from a model hub. Checkpoints are built once into the user
cache, keyed by a hash of their spec, and reused.

`extra_tensors` and `config_json` add what the real checkpoint has beyond transformers' class
(KV-cache scales, a quantization_config), `quantize` stores weights in a quantized layout (AWQ,
GPTQ, NVFP4, FP8) with the quantization_config it implies, `remote_code` ships a configuration module with an
`auto_map` as the real checkpoints served with --trust-remote-code do. Every forged config is read
back with AutoConfig and compared with its spec, so it cannot drift into a shape the family's
transformers class never has.

`mutations` deliberately break a checkpoint (rename, drop or reshape a tensor, add an unexpected
one) so the load-failure path of the suite can be exercised against real vLLM.

What a spec may ask for (and the size limits on it) is forge_spec.py; the edits of the written
tensor files (extra tensors, FP8 blocks, mutations) are forge_tensors.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from servematrix.config.forge_spec import ForgeSpec, TokenizerSpec
from servematrix.checkpoint.forge_tensors import (add_tensors, mutate, quantize_fp8_blocks, quantize_weights,
                                                  rename_tensors, save_tensors, tensor_names)
from servematrix.config.quantize import quantization_config
from servematrix.paths import build_cached, cache_dir, code_digest, gsm8k_test_jsonl

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# What a forged checkpoint's bytes depend on besides its spec: the modules that write it and the
# libraries they call (transformers' classes, the trained tokenizer, torch's RNG and serializer).
WRITERS = ("checkpoint/forge.py", "checkpoint/forge_tensors.py", "config/quantize.py", "checkpoint/quant_pack.py")
LIBRARIES = ("transformers", "tokenizers", "torch", "safetensors")


def checkpoint_dir(name: str, spec: ForgeSpec) -> Path:
    return cache_dir() / "forged" / f"{name}-{spec.key()}-{code_digest(WRITERS, LIBRARIES)}"


def forge(name: str, spec: ForgeSpec) -> Path:
    """Return the cached checkpoint for `spec`, building it first if needed."""

    def build(out: Path) -> dict:
        tokenizer = _train_tokenizer(spec.tokenizer)
        tokenizer.save_pretrained(out)
        _pin_tokenizer_class(out)
        _write_model(spec, len(tokenizer), tokenizer, out)
        _write_components(spec, out)
        add_tensors(out, spec)
        quantize_fp8_blocks(out, spec)
        quantize_weights(out, spec.quantize, spec.dtype)
        _patch_config(out, spec)
        unknown = check_config(out, spec)
        for mutation in spec.mutations:
            mutate(out, mutation)
        return {"name": name, "spec": spec.model_dump(), "fields_not_in_config_class": unknown}

    return build_cached(checkpoint_dir(name, spec), "forge.json", build)


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in gsm8k_test_jsonl().read_text().splitlines() if line.strip()]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def _train_tokenizer(spec: TokenizerSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if spec.chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def _pin_tokenizer_class(out: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which older transformers (in older vLLM envs)
    # cannot resolve; PreTrainedTokenizerFast loads everywhere.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def model_class(model_type: str, architecture: str):
    """The transformers class the forge writes for `architecture`: the family's causal-LM class
    (AutoModelForCausalLM) for a causal LM or a class transformers does not have (a composite's
    text model); otherwise the class of that name where it belongs to `model_type` (an encoder such
    as BertModel, whose tensor names are not its causal-LM class's `bert.`-prefixed ones)."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return AutoModelForCausalLM
    cls = getattr(transformers, architecture, None)
    if cls is not None and getattr(getattr(cls, "config_class", None), "model_type", None) == model_type:
        return cls
    return AutoModelForCausalLM


def build_model(cls, config, dtype):
    """`cls` built from `config` (an Auto class by from_config, a model class by _from_config)."""
    return (getattr(cls, "from_config", None) or cls._from_config)(config, dtype=dtype)


def _write_model(spec: ForgeSpec, vocab_size: int, tokenizer, out: Path) -> None:
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the runner's progress lines are the only ones we print

    config = AutoConfig.for_model(
        spec.text_model_type or spec.model_type,
        **{
            **spec.config,
            "vocab_size": vocab_size,
            "architectures": [spec.architecture],
            "initializer_range": spec.init_std,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    torch.manual_seed(spec.seed)
    model = build_model(model_class(spec.text_model_type or spec.model_type, spec.architecture), config,
                        getattr(torch, spec.dtype))
    with torch.no_grad():
        # transformers initialises norms to 1 and some projections to 0; re-draw every weight
        # matrix so each one carries signal and a wrong shard changes the output.
        gen = torch.Generator().manual_seed(spec.seed)
        for pname, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * spec.init_std)
            elif "norm" in pname:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    if spec.text_prefix:
        rename_tensors(out, lambda name: spec.text_prefix + name)
    if spec.text_model_type and spec.text_config_key:  # the text model's config nested, as its own
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        path = out / "config.json"
        saved = json.loads(path.read_text())
        text = {**{k: v for k, v in saved.items() if k != "transformers_version"},
                "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[spec.text_model_type]]}
        top = {k: saved[k] for k in ("dtype", "transformers_version") if k in saved}
        path.write_text(json.dumps({**top, "model_type": spec.model_type, "architectures": [spec.architecture],
                                    spec.text_config_key: text}, indent=2))
    elif spec.text_model_type:  # the top config names the composite; the text model's fields stay
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": spec.model_type,
                                    "architectures": [spec.architecture]}, indent=2))


def _write_components(spec: ForgeSpec, out: Path) -> None:
    """Each component by its own transformers class, re-drawn like the text model (norms near 1, every
    other float tensor random), its tensors renamed into the checkpoint and its config stored in the
    top config (nested as save_pretrained writes a config where the text model is nested too)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    if not spec.components:
        return
    path = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(path)
    top = json.loads((out / "config.json").read_text())
    gen = torch.Generator().manual_seed(spec.seed + 1)
    for comp in spec.components:
        config = AutoConfig.for_model(comp.model_type, **comp.config)
        model = AutoModel.from_config(config, dtype=getattr(torch, spec.dtype))
        for name, tensor in model.state_dict().items():
            if comp.strip and name.startswith(comp.strip):
                name = name[len(comp.strip):]
            if tensor.dim() >= 2:
                drawn = torch.randn(tensor.shape, generator=gen) * spec.init_std
            elif tensor.is_floating_point() and tensor.numel() > 1:
                # norms and biases too, as the text model's norms are: the class's ones and zeros would
                # match any parameter of their shape, so a load check could not tell them read
                noise = torch.randn(tensor.shape, generator=gen)
                drawn = 1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else noise * spec.init_std
            else:
                drawn = tensor
            tensors[comp.prefix + name] = drawn.to(tensor.dtype).contiguous()
        # nested as a published composite's (Llava's vision_config): the fields that differ from the class's
        # defaults, as save_pretrained writes a config; the flat composite's (MiniCPM-V's) stays whole
        top[comp.config_key] = config.to_diff_dict() if spec.text_config_key else config.to_dict()
    save_tensors(out, path, tensors)
    (out / "config.json").write_text(json.dumps(top, indent=2))


CONFIG_MODULE = '''"""Configuration of {model_type}, shipped with the checkpoint as the real one is, for
transformers releases that do not know the model type (--trust-remote-code)."""

from transformers.configuration_utils import PretrainedConfig


class {cls}(PretrainedConfig):
    model_type = "{model_type}"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            kwargs.setdefault(key, None if key != "tie_word_embeddings" else False)
        for key, value in list(kwargs.items()):  # a component's config (vision_config), as an object
            if key.endswith("_config") and key != "quantization_config" and isinstance(value, dict):
                kwargs[key] = PretrainedConfig(**value)
        super().__init__(**kwargs)
'''


def _patch_config(out: Path, spec: ForgeSpec) -> None:
    path = out / "config.json"
    config = json.loads(path.read_text())
    implied = quantization_config(spec.quantize, tensor_names(out) if spec.quantize else ())
    if implied is not None:
        config["quantization_config"] = implied
    config.update(spec.config_json)
    if spec.remote_code:
        cls = "".join(p.capitalize() for p in spec.model_type.split("_")) + "Config"
        module = f"configuration_{spec.model_type}"
        (out / f"{module}.py").write_text(CONFIG_MODULE.format(model_type=spec.model_type, cls=cls))
        config["auto_map"] = {"AutoConfig": f"{module}.{cls}"}
    path.write_text(json.dumps(config, indent=2))


HETEROGENEOUS = "per_layer_config"  # transformers' per-layer overrides of a heterogeneous config


def read_field(config: Any, key: str, default: Any = None) -> Any:
    """A config field as the class reads it. In a heterogeneous config (transformers' per_layer_config:
    Gemma 4's full-attention layers with a head_dim of their own) a per-layer field is ambiguous on
    the whole config and transformers refuses the plain read; its global value is what config.json
    states, and the per-layer overrides refine it. The overrides themselves the class holds as a view
    of per-layer configs: read as it saves them ({layer index: {field: value}})."""
    if key == HETEROGENEOUS:
        return config.to_dict().get(key, default)
    try:
        return getattr(config, key, default)
    except RuntimeError as exc:  # transformers' AmbiguousGlobalPerLayerAttributeError
        if type(exc).__name__ != "AmbiguousGlobalPerLayerAttributeError":
            raise
    import logging

    # the opt-in transformers' refusal names, on this read only: set as an attribute it would be saved.
    # Its warning ("only do this if the caller can safely handle heterogeneous configs") is for model
    # code; a twin's plan reads the overrides as well, so it is not printed into the sweep's log
    quiet = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    config.__dict__["allow_global_per_layer_attribute_access"] = True
    quiet.disabled = True
    try:
        return getattr(config, key, default)
    finally:
        quiet.disabled = False
        config.__dict__.pop("allow_global_per_layer_attribute_access", None)


def _reads_back(want, got) -> bool:
    """Whether the configuration class read the forged value `want` back as `got` unchanged: equal,
    a list as a tuple or list, one value a class expands per layer (Gemma 3n's intermediate_size),
    or a dict read into a sub-config object holding every given field (DBRX's ffn_config)."""
    if got == want or (isinstance(want, list) and list(got or []) == want):
        return True
    if isinstance(want, int) and isinstance(got, list):
        return bool(got) and all(g == want for g in got)
    if isinstance(want, dict) and hasattr(got, "to_dict"):
        return all(got.to_dict().get(k) == v for k, v in want.items())
    return False


def check_config(out: Path, spec: ForgeSpec) -> list[str]:
    """Read the forged config back with transformers' own class for the family (AutoConfig, no
    remote code) and refuse any drift: another model_type or architecture, or a field whose value
    the class changes. A composite (a model type only remote code knows) is read back part by
    part: its text model and each component with their own classes. Returns the spec's fields the
    class does not declare (kept, but listed in forge.json: a real checkpoint may carry fields a
    transformers release does not know)."""
    import inspect

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = json.loads((out / "config.json").read_text())
    problems = []
    if spec.text_model_type:
        parts = {c.config_key for c in spec.components} | {"model_type", "auto_map", "architectures"}
        if spec.text_config_key:  # nested (Llava's text_config): read as its own config
            text = {k: v for k, v in (data.get(spec.text_config_key) or {}).items() if k not in parts}
        else:
            text = {k: v for k, v in data.items() if k not in parts}
        config = AutoConfig.for_model(spec.text_model_type, **text)
        checks = [(config, spec.config, "")]
        checks += [(AutoConfig.for_model(c.model_type, **{k: v for k, v in data[c.config_key].items()
                                                          if k != "model_type"}), c.config, f"{c.config_key}.")
                   for c in spec.components]
        if spec.text_config_key and spec.model_type in CONFIG_MAPPING:  # transformers' own composite reads it too
            whole = AutoConfig.from_pretrained(out, trust_remote_code=False)
            checks += [(getattr(whole, spec.text_config_key, None), spec.config, f"{spec.text_config_key}.")]
            checks += [(getattr(whole, c.config_key, None), c.config, f"{c.config_key}.") for c in spec.components]
        model_type, architectures = data.get("model_type"), data.get("architectures")
    else:
        config = AutoConfig.from_pretrained(out, trust_remote_code=False)
        checks = [(config, spec.config, "")]
        model_type, architectures = config.model_type, config.architectures
    if model_type != spec.model_type:
        problems.append(f"model_type {model_type!r} != {spec.model_type!r}")
    if list(architectures or []) != [spec.architecture]:
        problems.append(f"architectures {architectures} != [{spec.architecture!r}]")
    unknown = []
    for cls_config, wanted, where in checks:
        for key, want in wanted.items():
            got = read_field(cls_config, key)
            if not _reads_back(want, got):
                problems.append(f"{where}{key}: {want!r} became {got!r}")
        declared = set(inspect.signature(type(cls_config).__init__).parameters) | set(dir(type(cls_config)))
        unknown += [f"{where}{k}" for k in wanted if k not in declared]
    if problems:
        raise ValueError(f"forged {spec.architecture} config drifted from transformers' "
                         f"{type(config).__name__}: " + "; ".join(problems))
    return sorted(unknown)
