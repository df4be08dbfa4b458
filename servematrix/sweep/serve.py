"""The sweep's serve step (`--depth serve`): after a cell's load check passes, the pipeline's serve
phase (run/pipeline.py's `started` and `smoke_phase`, the ones a matrix entry's server goes through:
spawn, wait for /health while watching the process, stop the tree on every path) on the same
command line, with one greedy completion (an embedding model: one /v1/embeddings request, the
pipeline's `embedding_phase`), so forward-time bugs (#38191: loads, then crashes or answers
nothing) show too. What stays here is the sweep's data: which cells are served and why not.

Which cells are served is data: the twin's own scenario (the mirror writes `load_check:` for
families with no CPU attention kernel, MLA) and the `serve:` section of data/sweep-quants.yaml (per
quantization and per model_type, each with its reason). A cell that is not served keeps its load
check's verdict and says why it stopped there. A served cell that dies at start-up, hangs or
answers nothing fails with the server's own signature, phase `serve`: that cell alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from servematrix.config.scenario import SmokeSpec
from servematrix.record import Failure, StageFailed
from servematrix.sweep.rules import ServeRules, load

DEPTHS = ("load", "serve")  # `--depth`: load (construct + load_weights) is the default, serve adds a server
SERVED_NAME = "sweep-twin"  # --served-model-name: every twin answers to one name


def rules() -> ServeRules:
    return load().serve


def gpu_only(failure: Failure) -> bool:
    """Whether `failure` stopped at a library the CPU install lacks (GPU-only ones, torchvision) (data/sweep-quants.yaml `gpu_only`)."""
    return any(re.search(p, failure.signature) for p in load().gpu_only)


def declared_limit(failure: Failure, arch: str) -> str | None:
    """Why vLLM itself declares the cell's layout unsupported for `arch` (data/sweep-quants.yaml
    `declared_limits`; None: the failure is no such refusal)."""
    return load().declared(failure.signature, arch)


def serve_argv(load_argv: list[str], port: int) -> list[str]:
    """The load check's server command line, listening on `port` under one model name."""
    return [*load_argv, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME]


def smoke_spec(embed_dim: int | None = None) -> SmokeSpec:
    """What the serve step asks a cell's server: one greedy completion, or (an embedding model,
    `embed_dim` its vectors' width) the data's inputs in one /v1/embeddings request."""
    r = rules()
    if embed_dim is not None:
        return SmokeSpec(embedding=r.embedding.model_copy(update={"dimension": embed_dim}), parity={"enabled": False},
                         request_timeout=r.request_timeout)
    return SmokeSpec(prompts=[r.prompt], parity={"enabled": False}, request_timeout=r.request_timeout)


def serve(load_spec, log_path: Path, timeout: float, make_server=None, embed_dim: int | None = None):
    """The pipeline's serve phase (run/pipeline.py: `started`, then `smoke_phase`, or for an
    embedding model `embedding_phase`) on the cell's load-check command line. The typed Parts it
    filled (`load`, `smoke` or `embedding`) and its failure (phase `serve`), or None when the server
    started and answered. `make_server`: a LaunchSpec -> Server factory (default: serve/server.py's
    local kind)."""
    from servematrix.run.pipeline import Parts, embedding_phase, smoke_phase, started
    from servematrix.serve import process
    from servematrix.serve.server import LaunchSpec, server_factory

    port = process.free_port()
    spec = LaunchSpec(argv=serve_argv(load_spec.argv, port), env=load_spec.env, port=port, log_path=log_path,
                      startup_timeout=timeout)
    asked = smoke_spec(embed_dim)
    parts = Parts(model=SERVED_NAME)  # the command line heads the log (LocalServer writes it first)
    try:
        with started(make_server or server_factory("local"), spec, parts) as server:
            phase = embedding_phase if asked.embedding is not None else smoke_phase
            phase(server, spec, SERVED_NAME, asked, parts)
    except StageFailed as exc:
        for name, value in exc.recorded.items():
            setattr(parts, name, value)
        return parts, _phase(exc.failure)
    return parts, None


def _phase(failure: Failure) -> Failure:
    return failure.model_copy(update={"phase": "serve"})
