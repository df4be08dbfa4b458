"""Native layout probe: runs inside a vLLM environment (stdlib, torch and vLLM only; started with
`python -P`) and answers, for a checkpoint directory holding a config.json alone, which tensors
(name, shape) a checkpoint must hold for vLLM's own model class of that config.

It builds the class vLLM's registry resolves for the config's `architectures`, on the meta device
at TP=1 and PP=1 (every parameter whole), exactly as the load check builds it (the engine config
from vLLM's own argument parser), then inverts what the class's weight loading does to a
checkpoint's names:

- the class's `hf_to_vllm_mapper` (WeightsMapper: stacked, prefix, substring and suffix rules),
- its `packed_modules_mapping` (one vLLM module stacked from several checkpoint modules),
- the experts of each routed-experts layer, through the layer's own `get_expert_mapping()`
  (the checkpoint spellings vLLM stores with the layer),

splitting a stacked parameter by the sizes its layer records (q/k/v heads, output sizes). Each name
derived from a mapper rule is checked forward through the mapper again (the name vLLM would load it
as) and kept only if it comes back to the parameter; names from packed_modules_mapping, from vLLM's
qkv_proj/gate_up_proj convention and from an experts layer are not (the load check is their check).
A stacked parameter no name is found for is reported (`unmapped`), never written.

For a model_type transformers has no configuration class for (remote code only), `--config-type`
registers a plain `PretrainedConfig` subclass for it (no field derived, nothing copied): every
config.json field becomes an attribute, which is what the model file reads.

Prints one line: NATIVE_LAYOUT <json> with `tensors` ({name: [shape]}), `unmapped` (parameters no
checkpoint name was derived for, with why), `class`, `config_class`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback

MARK = "NATIVE_LAYOUT"

# the stacks vLLM's load_weights builds by its own convention where a class declares neither a mapper rule
# nor packed_modules_mapping for them (its `stacked_params_mapping` is a local of load_weights: llama.py's,
# step3_text.py's): the checkpoint names each shard is read from, in order
CONVENTION = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def register_config_types(types: list[str]) -> list[str]:
    """The load check's own (loadcheck_worker.register_config_types), loaded from beside this file:
    the probe parses the config exactly as the load check will."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_servematrix_loadcheck_worker",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "loadcheck_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.register_config_types(types)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(module, param_name: str, shape: list[int]):
    """The shards a stacked parameter holds, in order: [(shard_id, rows)], or None when whole."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    leaf = param_name.rsplit(".", 1)[-1]
    if leaf not in ("weight", "bias"):
        return None
    if isinstance(module, QKVParallelLinear):
        hd = module.head_size
        vhd = getattr(module, "v_head_size", hd) or hd
        return [("q", module.total_num_heads * hd), ("k", module.total_num_kv_heads * hd),
                ("v", module.total_num_kv_heads * vhd)]
    if isinstance(module, MergedColumnParallelLinear):
        return list(enumerate(module.output_sizes))
    return None


def _inverse(mapper, vllm_name: str, shard) -> list[str]:
    """Checkpoint names the mapper takes to `vllm_name` (with `shard` for a stacked rule)."""
    out = []
    if mapper is None:
        return [vllm_name] if shard is None else []
    stacked = getattr(mapper, "orig_to_new_stacked", {}) or {}
    candidates = []
    if shard is not None:
        for src, (dst, sid) in stacked.items():
            ids = sid if isinstance(sid, (list, tuple)) else [sid]
            if dst in vllm_name and shard in ids:
                candidates.append(vllm_name.replace(dst, src, 1))
    else:
        candidates.append(vllm_name)
    # undo prefix / substring / suffix renames (each rule tried alone and all together)
    rules = []
    for attr, how in (("orig_to_new_prefix", "prefix"), ("orig_to_new_substr", "substr"),
                      ("orig_to_new_suffix", "suffix")):
        for src, dst in (getattr(mapper, attr, {}) or {}).items():
            if dst is not None:
                rules.append((how, src, dst))
    expanded = []
    for c in candidates:
        names = {c: 1}  # rank: 0 rewritten by a rule, 1 as vLLM names it, 2 a dropped submodule guessed back
        for how, src, dst in rules:
            for n, rank in list(names.items()):
                if how == "prefix" and n.startswith(dst):
                    names.setdefault(src + n[len(dst):], min(rank, 0))
                elif how == "suffix" and n.endswith(dst):
                    names.setdefault(n[: len(n) - len(dst)] + src, min(rank, 0))
                elif how == "substr" and dst == "" and "." in n:
                    # a dropped submodule (ChatGLM's `.word_embeddings`): which module it sat under is not in
                    # the rule, so the guess (before the parameter's own name) ranks last
                    head, _, leaf = n.rpartition(".")
                    names.setdefault(f"{head}{src}.{leaf}", 2)
                elif how == "substr" and dst and dst in n:
                    names.setdefault(n.replace(dst, src, 1), min(rank, 0))
        # a name the mapper rewrites first: its rules exist to translate the published spellings
        expanded += sorted(names, key=lambda n: (names[n], n))
    for n in expanded:
        mapped = mapper._map_name_with_shard(n)
        if mapped is None:
            continue
        name, sid = mapped
        ids = sid if isinstance(sid, (list, tuple)) else [sid]
        if name == vllm_name and (shard is None or shard in ids) and n not in out:
            out.append(n)
    return out


def probe(directory: str, dtype: str) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    args = EngineArgs(model=directory, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
                      distributed_executor_backend="mp")
    config = args.create_engine_config()
    result = {"config_class": f"{type(config.model_config.hf_config).__module__}."
                              f"{type(config.model_config.hf_config).__qualname__}"}
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
        initialize_model_parallel(1, 1)
        with set_default_torch_dtype(config.model_config.dtype), torch.device("meta"):
            model = initialize_model(vllm_config=config, model_config=config.model_config)
    result["class"] = type(model).__name__
    # each module's own hf_to_vllm_mapper applies to the names below it (ChatGLM declares it on the inner
    # ChatGLMModel, whose load_weights sees names relative to itself): the outermost one is used
    mappers = sorted(((n, m.hf_to_vllm_mapper) for n, m in model.named_modules()
                      if getattr(m, "hf_to_vllm_mapper", None) is not None), key=lambda item: len(item[0]))

    def inv(name: str, shard) -> list[str]:
        for prefix, mapper in mappers:
            if not prefix or name.startswith(prefix + "."):
                rel = name[len(prefix) + 1:] if prefix else name
                return [f"{prefix}.{n}" if prefix else n for n in _inverse(mapper, rel, shard)]
        return _inverse(None, name, shard)

    packed = getattr(model, "packed_modules_mapping", {}) or {}
    modules = dict(model.named_modules())
    tensors: dict[str, list[int]] = {}
    unmapped: dict[str, str] = {}
    stacks: list[list[str]] = []  # checkpoint tensors stacked into one parameter, in vLLM's order
    done_experts: set[str] = set()
    tied = bool(getattr(config.model_config.hf_config, "tie_word_embeddings", False))
    for pname, param in model.named_parameters():
        mod_name, _, leaf = pname.rpartition(".")
        module = modules.get(mod_name)
        shape = list(param.shape)
        if tied and pname.startswith("lm_head."):
            continue  # the checkpoint holds the embedding alone
        if module is not None and hasattr(module, "get_expert_mapping"):
            if mod_name in done_experts:
                continue
            done_experts.add(mod_name)
            # the layer matches checkpoint names against its own layer_name (the prefix its model gave it), which
            # need not be its module path: vLLM 0.32's routed experts sit one level below the MoE layer
            # (`<prefix>.routed_experts`), and some models pass a prefix without their own root (Step3's
            # `.layers.1.moe.experts`): the module path that ends with the layer name is the checkpoint's
            tail = (getattr(module, "layer_name", None) or "").lstrip(".")
            parent = mod_name.rpartition(".")[0]
            layer = next((p for p in (mod_name, parent) if tail and (p == tail or p.endswith("." + tail))), parent)
            e_params = dict(module.named_parameters(recurse=False))
            for p_prefix, w_name, expert, shard in module.get_expert_mapping():
                for suffix in ("weight", "bias"):
                    full = f"{p_prefix}{suffix}"
                    local = full.split("experts.", 1)[1] if full.startswith("experts.") else full
                    if local not in e_params:
                        continue
                    p = e_params[local]
                    # w13: [E, 2I(, H)] gate and up; w2: [E, H(, I)]
                    rows = list(p.shape[1:])
                    if shard in ("w1", "w3") and "w13" in local:
                        rows[0] //= 2
                    rel = w_name[len("experts."):] if w_name.startswith("experts.") else w_name
                    ck = f"{layer}.{rel}{suffix}"
                    names = inv(ck, None)
                    # the experts' names are matched by the layer, not the mapper: keep the raw one too
                    tensors[(names or [ck])[0]] = rows
            continue
        if module is not None and hasattr(module, "num_embeddings_padded") and shape and \
                shape[0] == module.num_embeddings_padded:
            shape = [module.num_embeddings, *shape[1:]]  # vLLM pads the vocabulary; the checkpoint does not
        parts = _split(module, pname, shape) if module is not None else None
        short = mod_name.rpartition(".")[2]
        if parts is None:
            names = inv(pname, None)
            if not names:
                names = [pname]
            tensors[names[0]] = shape
            continue
        sources = packed.get(short)
        if sources is not None and len(sources) == 1:  # a fused checkpoint tensor (InternLM2's wqkv)
            name = pname.replace(f".{short}.", f".{sources[0]}.")
            names = inv(name, None)
            tensors[(names or [name])[0]] = shape
            continue
        members = []
        for i, (sid, rows) in enumerate(parts):
            cands = inv(pname, sid)
            if not cands and sources is not None and len(sources) == len(parts):
                cands = [pname.replace(f".{short}.", f".{sources[i]}.")]
            conv = CONVENTION.get(short)
            if not cands and sources is None and conv is not None and len(conv) == len(parts):
                cands = [pname.replace(f".{short}.", f".{conv[i]}.")]
            if not cands:
                unmapped[f"{pname}[{sid}]"] = f"no checkpoint name for shard {sid!r} of {type(module).__name__}"
                continue
            tensors[cands[0]] = [rows, *shape[1:]]
            members.append(cands[0])
        if len(members) == len(parts):
            stacks.append(members)
    result.update(tensors=tensors, unmapped=unmapped, stacks=stacks)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--config-type", action="append", default=[])
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_DIST_IDENT", f"servematrix-native-probe-{os.getpid()}")
    try:
        plain = register_config_types(a.config_type)
        out = probe(a.directory, a.dtype)
        out["plain_config_types"] = plain  # the ones neither transformers nor vLLM had a class for
    except BaseException as exc:  # noqa: BLE001 - reported as the probe's error, one line
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(f"{MARK} {json.dumps(out)}", flush=True)
    sys.stdout.flush()
    os._exit(0 if "error" not in out else 1)


if __name__ == "__main__":
    main()
