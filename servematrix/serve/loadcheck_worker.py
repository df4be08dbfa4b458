"""Load check worker: runs inside a vLLM environment (stdlib, torch and vLLM only; started with
`python -P` so this folder's modules shadow nothing) and drives vLLM's own model loader for a
checkpoint under a TP×PP layout, one process per rank as vLLM's workers are.

The command line is the server's (vLLM's own OpenAI-server parser reads it), plus this worker's
`--loadcheck-*` flags. Each rank loads vLLM's general plugins (the servematrix fix modules among
them, as every vLLM worker does), builds the engine config, joins a gloo process group, then runs
vLLM's model loader as `load_model` does: the model class with its PP-missing layers, then the
loader's `load_weights` over the checkpoint. No forward pass runs, and neither does
`process_weights_after_loading` (kernel preparation, which needs the kernels). Each rank writes
`rank<N>.json` (parameter count and content digests, or the error); a rank that fails prints its
traceback first, so the runner's failure classifier finds the signature in the log.

Where this platform has no attention backend for the model (MLA and sparse MLA on CPU), the layers
are built with the backend a GPU would pick, named on the command line; its kernels never run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback

MARK = "SERVEMATRIX_LOADCHECK"
PARSER_MODULES = ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args",
                  "vllm.entrypoints.common.cli_args")


def _args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This worker's own flags; everything else is the server's command line, parsed below by
    vLLM's own OpenAI-server parser so the check builds exactly the engine the server would."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--loadcheck-mla-backend", default=None, help="AttentionBackendEnum name for MLA layers")
    p.add_argument("--loadcheck-sparse-backend", default=None, help="... for sparse MLA layers")
    p.add_argument("--loadcheck-out", required=True, help="directory for one JSON result per rank")
    p.add_argument("--loadcheck-construct-only", action="store_true", help="build the model, load no weights")
    p.add_argument("--loadcheck-record-misses", action="store_true",
                   help="list every config attribute the model asked for and the config lacked")
    p.add_argument("--loadcheck-draft", action="store_true",
                   help="then build and load the speculative draft the command line's --speculative-config names")
    p.add_argument("--loadcheck-config-type", action="append", default=[],
                   help="a model_type neither transformers nor vLLM has a configuration class for: read its "
                        "config.json as a plain PretrainedConfig (every field an attribute, nothing derived)")
    return p.parse_known_args(argv)


def register_config_types(types: list[str]) -> list[str]:
    """A plain configuration class for each model_type that neither transformers nor vLLM's own
    config registry knows (a family published with remote code only): its config.json's fields
    become attributes as they are, nothing derived, no remote code run. The model file reads them;
    what it asks for and the json lacks is recorded by --loadcheck-record-misses like any other
    miss. A type may carry the remote class's attribute aliases (its `attribute_map`, the one thing
    a plain class cannot know): `exaone:num_hidden_layers=num_layers`. Returns the types registered
    (one transformers or vLLM already knows is left to its own class)."""
    if not types:
        return []
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY as vllm_configs
    except ImportError:
        vllm_configs = {}
    done = []
    for spec in types:
        model_type, _, alias_text = spec.partition(":")
        if model_type in CONFIG_MAPPING or model_type in vllm_configs:
            continue
        aliases = dict(a.split("=", 1) for a in alias_text.split(",") if "=" in a)
        name = "".join(part.capitalize() for part in model_type.replace("-", "_").split("_")) + "PlainConfig"
        AutoConfig.register(model_type, type(name, (PretrainedConfig,), {"model_type": model_type,
                                                                        "attribute_map": aliases}))
        done.append(spec)
    return done


def _record_misses(model_config) -> list[str]:
    """Make the model's configs recording configs: every attribute vLLM's model code asks for that
    the config lacks (an AttributeError, also where the code catches it: hasattr, getattr with a
    default) is appended to the returned list, in order, while the error stays exactly what it was.
    The sweep tells from this list whether a failure is the twin's (a field the family's published
    configs carry) or vLLM's. Each rank is a process of its own: the class swap dies with it."""
    misses: list[str] = []
    seen: set[int] = set()
    for attr in ("hf_config", "hf_text_config"):
        cfg = getattr(model_config, attr, None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        base = type(cfg)
        inherited = getattr(base, "__getattr__", None)

        def __getattr__(self, name, _base=base, _inherited=inherited):
            try:
                if _inherited is None:
                    raise AttributeError(f"'{_base.__name__}' object has no attribute '{name}'")
                return _inherited(self, name)
            except AttributeError:
                if not name.startswith("__"):
                    misses.append(name)
                raise

        # same name and module: error messages and reprs read as the real class's
        cfg.__class__ = type(base.__name__, (base,), {"__getattr__": __getattr__, "__module__": base.__module__,
                                                      "__qualname__": base.__qualname__})
    return misses


def _engine_args(server_argv: list[str]):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import importlib

    # where vLLM has kept the OpenAI server's parser (0.30 moved it with the launchers, 0.34 to
    # entrypoints.common): the first that imports, no version asked
    for module in PARSER_MODULES:
        try:
            make_arg_parser = importlib.import_module(module).make_arg_parser
            break
        except ImportError:
            continue
    else:
        raise ImportError(f"no OpenAI-server argument parser in {', '.join(PARSER_MODULES)}")

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(server_argv)
    engine_args = EngineArgs.from_cli_args(parsed)
    # one process per rank is started here, not by an executor
    engine_args.distributed_executor_backend = "mp"
    return engine_args


def _pick_backends(mla: str | None, sparse: str | None) -> None:
    """Let the platform name a backend for the layers it refuses to build (the choice only)."""
    if not (mla or sparse):
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if sparse and attn_selector_config.use_sparse:
            return AttentionBackendEnum[sparse].get_path()
        if mla and attn_selector_config.use_mla:
            return AttentionBackendEnum[mla].get_path()
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _kernel_less_prefill()


def _kernel_less_prefill() -> None:
    """vLLM 0.21+ gives every MLA layer a prefill backend, and where the platform reports no device
    capability it takes FlashAttention's, whose constructor asserts that the GPU library's
    `flash_attn_varlen_func` was imported. Fill that slot with a function that refuses to run: a
    load check never runs a forward pass, so any call is a bug in the check, and says so."""
    try:
        from vllm.v1.attention.backends.mla.prefill import flash_attn
    except ImportError:  # before 0.21 the MLA backend did its own prefill
        return

    def flash_attn_varlen_func(*args, **kwargs):
        raise RuntimeError("servematrix load check: no attention kernel runs")

    if getattr(flash_attn, "flash_attn_varlen_func", None) is None:
        flash_attn.flash_attn_varlen_func = flash_attn_varlen_func


def _rank(rank: int, args: argparse.Namespace, server_argv: list[str], port: int) -> None:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.plugins import load_general_plugins

    t0 = time.monotonic()
    result = {"rank": rank, "ok": False, "pid": os.getpid()}
    try:
        load_general_plugins()  # what every vLLM worker does first: the fix modules apply here
        _pick_backends(args.loadcheck_mla_backend, args.loadcheck_sparse_backend)
        plain = register_config_types(args.loadcheck_config_type)
        if plain:
            result["plain_config_types"] = plain
        config = _engine_args(server_argv).create_engine_config()
        if args.loadcheck_record_misses:
            cls = type(config.model_config.hf_config)  # vLLM's own config class, or transformers'
            result["config_class"] = f"{cls.__module__}.{cls.__qualname__}"
            result["config_misses"] = _record_misses(config.model_config)  # filled while the model is built
        par = config.parallel_config
        result.update(tp=par.tensor_parallel_size, pp=par.pipeline_parallel_size)
        with set_current_vllm_config(config):
            init_distributed_environment(world_size=par.world_size, rank=rank, local_rank=rank, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(par.tensor_parallel_size, par.pipeline_parallel_size)
            _workspace(torch)
            model = _load(config, not args.loadcheck_construct_only)
        result["steps"] = ["construct"] if args.loadcheck_construct_only else ["construct", "load"]
        params = dict(model.named_parameters())
        result.update(model=type(model).__name__, parameters=len(params),
                      numel=int(sum(p.numel() for p in params.values())))
        if not args.loadcheck_construct_only:  # unloaded parameters hold whatever memory held
            result["digests"] = {n: _digest(p) for n, p in params.items()}
        if args.loadcheck_draft:
            _draft(config, args, result, model)
        result["ok"] = True  # only once everything the check reports is in: never ok beside an error
    except BaseException as exc:  # noqa: BLE001 - reported, then the rank exits non-zero
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    if "config_misses" in result:  # in the order read, each name once
        result["config_misses"] = list(dict.fromkeys(result["config_misses"]))
    result["seconds"] = round(time.monotonic() - t0, 2)
    with open(os.path.join(args.loadcheck_out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    print(f"{MARK} rank {rank}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s", flush=True)
    sys.stderr.flush()
    if result["ok"]:
        _wait_for_peers(args.loadcheck_out, result["tp"] * result["pp"])
    # the result is on disk: leave now. An orderly interpreter exit can wait minutes on the gloo
    # group and vLLM's helper threads (seen: 5 min after a 26 s check), and a failed rank's peers
    # may wait on it forever
    os._exit(0 if result["ok"] else 1)


def _wait_for_peers(out: str, world: int, timeout: float = 300.0) -> None:
    """Rank 0 hosts the TCP store the other ranks still use while they build their groups, so a rank
    that is done leaves only once every rank has written its result (seen: a PP=2 rank 0 done in 2.6 s
    left while rank 1 was in initialize_model_parallel, which failed `DistNetworkError: Broken pipe`).
    A rank that dies without a result is the runner's to kill; the wait is bounded anyway."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(out, f"rank{r}.json")) for r in range(world)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _draft(config, args: argparse.Namespace, result: dict, target) -> None:
    """The draft beside the target, where and as the model runner loads it: on the last PP rank
    only (vLLM puts the whole draft there), through the spec-decode proposer's `_get_model`
    steps, then its sharing of the target's embedding and head (`_share`). Into `result`: the draft
    architecture vLLM resolved, its class, parameter count, the digests of its parameters and
    persistent buffers as its loader left them, and of the parameters the sharing then replaced."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import get_pp_group

    spec = config.speculative_config
    if spec is not None and spec.draft_model_config is not None:
        result["draft_architecture"] = (spec.draft_model_config.architectures or [None])[0]
    if not get_pp_group().is_last_rank:
        result["draft"] = "not on this rank: vLLM builds the whole draft on the last PP rank"
        return
    with set_current_vllm_config(config):
        draft = _load_draft(config, not args.loadcheck_construct_only)
    params = dict(draft.named_parameters())
    result.update(draft_model=type(draft).__name__, draft_parameters=len(params))
    if not args.loadcheck_construct_only:
        result["draft_digests"] = {n: _digest(p) for n, p in params.items()}  # as its loader left them
        # persistent buffers are checkpoint state too (Gemma 4's assistant loads masked_embedding.token_ordering,
        # an int64 buffer, from its file): kept apart, so only the loaded count reads them
        result["draft_buffers"] = {f"{m}.{b}" if m else b: _digest(t) for m, mod in draft.named_modules()
                                   for b, t in mod._buffers.items()
                                   if t is not None and b not in mod._non_persistent_buffers_set}
        # then as the server runs it: the parameters the proposer replaced by the target's, and what they hold
        shared = _share(config, draft, target)
        after = dict(draft.named_parameters())
        result["draft_shared"] = None if shared is None else {n: _digest(after[n]) for n in shared if n in after}


def _share(config, draft, target) -> list[str] | None:
    """What the proposer's load_model does after loading the draft: replace the draft's embedding
    and LM head by the target's where vLLM decides to (an EAGLE draft whose checkpoint has none of
    its own, every MTP draft; the embedding at PP=1 only), through the proposer class's own
    `_maybe_share_embeddings` and `_maybe_share_lm_head`. A draft parameter that is never filled from
    its checkpoint but replaced this way is what every server runs; one left unfilled is not. The
    proposer class is picked as vLLM's model runner picks it (v1/worker/gpu_model_runner.py, which
    the CPU runner inherits); the names of the draft's parameters the sharing replaced are returned,
    None where this release's proposer has no such methods (older ones share inline in load_model)."""
    import types

    from vllm.model_executor.models.interfaces import supports_multimodal

    spec = config.speculative_config
    proposer = _proposer_class(spec)
    if proposer is None or not all(hasattr(proposer, m) for m in ("_maybe_share_embeddings", "_maybe_share_lm_head")):
        return None
    before = {n: id(p) for n, p in draft.named_parameters()}
    shim = types.SimpleNamespace(model=draft, vllm_config=config,
                                 use_local_argmax_reduction=getattr(spec, "use_local_argmax_reduction", False))
    language = target.get_language_model() if supports_multimodal(target) else target
    proposer._maybe_share_embeddings(shim, language)
    proposer._maybe_share_lm_head(shim, language)
    after = {n: id(p) for n, p in draft.named_parameters()}
    return sorted(n for n in before if after.get(n) != before[n])


def _proposer_class(spec):
    """The spec-decode proposer class vLLM's model runner builds for `spec`, in the runner's order
    (None: a method with no draft model, or a release without these classes)."""
    import importlib

    picks = (("uses_draft_model", "draft_model", "DraftModelProposer"),
             ("use_gemma4_mtp", "gemma4", "Gemma4Proposer"),
             ("use_step3p5_mtp", "step3p5", "Step3p5MTPProposer"),
             ("use_dflash", "dflash", "DFlashProposer"),
             ("use_eagle", "eagle", "EagleProposer"))
    for predicate, module, name in picks:
        test = getattr(spec, predicate, None)
        if test is not None and test():
            try:
                return getattr(importlib.import_module(f"vllm.v1.spec_decode.{module}"), name)
            except (ImportError, AttributeError):
                return None
    return None


def _workspace(torch) -> None:
    """Sparse MLA layers take scratch buffers from the worker's workspace (vLLM 0.20+), which a GPU
    worker sets up; here it lives on the CPU. Resizing it calls torch.accelerator.empty_cache(),
    which a CUDA-enabled torch without a device skips but a CPU-only torch (2.13+cpu) refuses:
    make it the same no-op where no accelerator exists."""
    try:
        from vllm.v1.worker.workspace import init_workspace_manager
    except ImportError:
        return
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.current_accelerator() is None:
        accel.empty_cache = lambda: None
    init_workspace_manager(torch.device("cpu"))


def _load(config, load_weights: bool = True, model_config=None, load_config=None):
    """The first two steps of vLLM's BaseModelLoader.load_model, as it runs them: build the model
    (PP-missing layers included) under the model dtype on the load device, then the loader's
    load_weights, which also refuses parameters the checkpoint left uninitialised. The third step,
    process_weights_after_loading, prepares kernels (and needs them): it is not run.
    `model_config`/`load_config`: another model's (a speculative draft's); default the engine's."""
    import torch
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = model_config or config.model_config
    load_config = load_config or config.load_config
    loader = get_model_loader(load_config)
    device = torch.device(load_config.device or config.device_config.device)
    with set_default_torch_dtype(model_config.dtype):
        with device:
            model = initialize_model(vllm_config=config, model_config=model_config)
        if load_weights:
            loader.load_weights(model, model_config)
    return model


def _load_draft(config, load_weights: bool = True):
    """The speculative draft as vLLM's spec-decode proposer gets it (v1/spec_decode's
    `_get_model`: the engine config with the speculative config's own attention backend, the
    draft's model config that SpeculativeConfig derived from the target's (an MTP draft: the
    target's checkpoint and config, its architecture rewritten to the draft's), the draft's load
    config, the `eagle_head` model tag), built and loaded by `_load`'s two steps (`_share` then
    does what the proposer's load_model does next). A config without a speculative config is this
    check's misuse: it says so."""
    from dataclasses import replace

    spec = config.speculative_config
    if spec is None or spec.draft_model_config is None:
        raise ValueError("servematrix load check: --loadcheck-draft without a --speculative-config naming a draft")
    # the speculative config's own attention backend (0.32); releases before it (0.20.2) give the draft the
    # engine's config as it is
    draft_config = (replace(config, attention_config=replace(config.attention_config, backend=spec.attention_backend))
                    if hasattr(spec, "attention_backend") else config)
    try:
        from vllm.model_executor.model_loader.utils import get_draft_load_config

        load_config = get_draft_load_config(draft_config)
    except ImportError:  # releases before that function: the speculative config's (0.20.2), else the engine's
        load_config = getattr(spec, "draft_load_config", None) or config.load_config
    try:
        from vllm.compilation.backends import set_model_tag
    except ImportError:
        import contextlib

        set_model_tag = lambda tag: contextlib.nullcontext()  # noqa: E731 - the tag only names compile caches
    with set_model_tag("eagle_head"):
        return _load(draft_config, load_weights, spec.draft_model_config, load_config)


def _digest(tensor) -> str:
    """Content hash of a loaded parameter, comparable across layouts and releases (PP places whole
    layers, so PP=2's ranks together must hold PP=1's parameters bit for bit)."""
    import hashlib

    import torch

    # reshape(-1): a 0-d tensor (a per-tensor FP8 scale) cannot be viewed as bytes
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype}:{list(tensor.shape)}:{hashlib.sha1(data).hexdigest()[:16]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm(ident: str, shm_dir: str = "/dev/shm") -> int:
    """Unlink the shared-memory files of the CPU communicator named after `ident` (`<ident>-tp:0-…`,
    `<ident>-pp:0-…`), once every rank that mapped them is dead. A rank that fails or is killed never
    unlinks its own: one sweep of the zoo left 7.2 GB of them in /dev/shm, until the next TP=2 check
    died with "Insufficient space in /dev/shm". Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        if name.startswith(ident + "-"):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed += 1
            except OSError:
                pass
    return removed


def main(argv: list[str] | None = None) -> int:
    args, server_argv = _args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.loadcheck_out, exist_ok=True)
    # the CPU communicator names its shared-memory groups after this (a CPU worker sets it)
    own = "VLLM_DIST_IDENT" not in os.environ
    ident = os.environ.setdefault("VLLM_DIST_IDENT", f"servematrix-loadcheck-{os.getpid()}")
    world = _world(server_argv)
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank, args=(args, server_argv, _free_port()), nprocs=world, join=False,
                             start_method="spawn")
    codes = []
    for proc in ctx.processes:
        proc.join()
        codes.append(proc.exitcode)
    if own:  # every rank has exited: nothing maps them any more
        remove_shm(ident)
    return 0 if all(c == 0 for c in codes) else 1


def _world(server_argv: list[str]) -> int:
    """TP×PP from the server's command line (the ranks are started before vLLM parses it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    known, _ = p.parse_known_args(server_argv)
    return known.tensor_parallel_size * known.pipeline_parallel_size


if __name__ == "__main__":
    sys.exit(main())
