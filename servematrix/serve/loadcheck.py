"""Load check: for a model this device cannot serve (sparse MLA has no CPU kernels), run vLLM's own
model construction and weight loading under the entry's TP×PP layout instead of a server, in the
entry's vLLM environment, with its fix modules (loadcheck_worker.py does the vLLM side).

The command line is the server's, so the check builds the engine the server would; the result is
the same LoadResult / Failure a server start gives, plus per-rank parameter counts and content
digests, which check.compare uses for PP parity (PP=2's ranks together must hold exactly the
parameters PP=1 loads).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, Field

from servematrix.serve import failure
from servematrix.record import Failure, LoadCheckResult, LoadResult, RankResult, StageFailed
from servematrix.serve.process import spawn, stop
from servematrix.serve.server import LaunchSpec

WORKER = Path(__file__).with_name("loadcheck_worker.py")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class Check(BaseModel):
    """How to check: attention backends to build layers with (by kind), whether to load the
    weights after building the model, where the ranks write their results."""

    attention: dict[str, str] = Field(default_factory=dict)
    load_weights: bool = True
    out: Path
    # rank<N>.json lists the config attributes the model asked for and the config lacked (the
    # sweep's twin-incomplete rule reads it)
    record_misses: bool = False
    # then build and load the speculative draft the command line's --speculative-config names, as the
    # spec-decode proposer does (rank<N>.json: draft_model, draft_parameters, draft_digests)
    draft: bool = False
    # model_types read as a plain PretrainedConfig (neither transformers nor vLLM has a class): a
    # native twin's (sweep/native.py)
    config_types: list[str] = Field(default_factory=list)


def command(spec: LaunchSpec, check: Check) -> list[str]:
    """The server's argv with the worker in place of the API server module."""
    argv = list(spec.argv)
    i = argv.index(SERVER_MODULE) if SERVER_MODULE in argv else -1
    if i < 1 or argv[i - 1] != "-m":
        raise ValueError(f"not a vLLM server command: {spec.shell()}")
    flags = [f"--loadcheck-{kind}-backend={name}" for kind, name in sorted(check.attention.items())]
    if not check.load_weights:
        flags.append("--loadcheck-construct-only")
    if check.record_misses:
        flags.append("--loadcheck-record-misses")
    if check.draft:
        flags.append("--loadcheck-draft")
    flags += [f"--loadcheck-config-type={t}" for t in check.config_types]
    # -P: the worker's folder (servematrix/) must not shadow stdlib modules (secrets, ...)
    return [argv[0], "-P", str(WORKER), f"--loadcheck-out={check.out}", *flags, *argv[i + 1:]]


def shell(spec: LaunchSpec, check: Check) -> str:
    """The check's command line as a shell would take it (environment first, secrets redacted)."""
    return spec.model_copy(update={"argv": command(spec, check)}).shell()


def run(spec: LaunchSpec, check: Check) -> LoadCheckResult:
    """Run the check to completion (or spec.startup_timeout); the log goes to spec.log_path. The
    result of a check every rank passed, else StageFailed with the result and the failure."""
    prepare(check)
    argv = command(spec, check)
    t0 = time.monotonic()
    code: int | None = None
    with open(spec.log_path, "wb", buffering=0) as log:
        log.write(f"$ {shell(spec, check)}\n".encode())
        proc = spawn(argv, spec.env, log)
        try:
            code = proc.wait(timeout=spec.startup_timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # on every path, Ctrl-C included: no rank outlives the check
            stop(proc, grace=0)  # the whole log is in the file once this returns
    return finish(spec, check, code, round(time.monotonic() - t0, 2))


def prepare(check: Check) -> None:
    """The results directory, empty of an earlier check's rank files."""
    check.out.mkdir(parents=True, exist_ok=True)
    for old in check.out.glob("rank*.json"):
        old.unlink()


def finish(spec: LaunchSpec, check: Check, code: int | None, seconds: float) -> LoadCheckResult:
    """The check's result from its rank files and exit status (None: it timed out), however it
    ran (a process of its own here, or a persistent sweep worker): the result of a check every
    rank passed, else StageFailed with the result and the failure classified from the log."""
    result = _collect(check.out, seconds)
    if code == 0 and result.ok:
        return result
    fail = timed_out(spec) if code is None else failure.classify_exit(
        spec.log_path.read_text(errors="replace"), code, "load")
    raise StageFailed(fail, load_check=result, load=LoadResult(ok=False, seconds=result.seconds, error=fail))


def timed_out(spec: LaunchSpec) -> Failure:
    return Failure.of("timeout", f"load check not done after {spec.startup_timeout:.0f} s", "load")


def _collect(out: Path, seconds: float) -> LoadCheckResult:
    ranks, digests = [], {}
    for path in sorted(out.glob("rank*.json")):
        data = json.loads(path.read_text())
        digests.update(data.pop("digests", None) or {})
        ranks.append(RankResult.model_validate({k: v for k, v in data.items() if k in RankResult.model_fields}))
    ok = bool(ranks) and all(r.ok for r in ranks)
    return LoadCheckResult(ok=ok, ranks=ranks, seconds=seconds, digests=digests if ok else {})
