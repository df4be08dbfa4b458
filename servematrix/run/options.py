"""What a run was asked to do, split by who reads it: `EntryOptions` is all one entry's pipeline
needs (it travels to each Ray task, and nothing more does); `RunOptions` adds what only the session
that runs a whole matrix reads (where to dispatch, which GPUs, whether the run directory may be
reused)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from servematrix.config import plan
from servematrix.serve.docker import DockerConfig


class EntryOptions(BaseModel):
    out_dir: Path
    server_kind: str = "local"  # a name of serve.server.SERVER_KINDS
    docker: DockerConfig | None = None  # the docker kind's settings (image, mounts, network)
    python: str | None = None  # interpreter that has vLLM and lm-eval (default: this one)
    gsm8k_limit: int | None = None  # --limit (beats the matrix's and the scenario's)
    gsm8k: bool = True  # False: --no-gsm8k
    startup_timeout: float | None = None  # --startup-timeout (beats the matrix's and the scenario's)
    retries: int = 1  # extra attempts for infrastructure failures
    inject: tuple[str, ...] = ()  # fix modules (e.g. fault injectors) enabled for every entry, ids unchanged


class RunOptions(BaseModel):
    entry: EntryOptions
    dispatcher: str = "local"  # local (this host's pool) | ray (a cluster)
    gpus: list[int] | None = None  # GPU ids this host may hand out (default: every visible GPU)
    ray_address: str | None = None  # ray: an existing cluster (default: start one here)
    overwrite: bool = False  # out_dir may already hold a run (its reports are written over)

    @property
    def out_dir(self) -> Path:
        return self.entry.out_dir

    @classmethod
    def of(cls, out_dir: Path, backend: str = "local", docker: DockerConfig | None = None,
           gpus: list[int] | None = None, ray_address: str | None = None, overwrite: bool = False,
           **entry) -> "RunOptions":
        """The options of a `--backend` value (see config.plan.dispatch) and the entry settings."""
        dispatcher, kind = plan.dispatch(backend)
        settings = (docker or DockerConfig()) if kind == "docker" else None
        return cls(entry=EntryOptions(out_dir=out_dir, server_kind=kind, docker=settings, **entry),
                   dispatcher=dispatcher, gpus=gpus, ray_address=ray_address, overwrite=overwrite)
