"""`servematrix sweep`: every architecture a release registers × layouts × quantizations, each cell
a load check of a mirrored twin (vLLM's own model construction and load_weights under the layout),
recorded as pass, fail with its signature, or not checkable here with the reason.

The run directory is `run`'s: summary.json of ScenarioRecords (scenario = the architecture's key,
tp/pp/quant/vllm the cell's axes, so the reports' grid is the heatmap, and `gate`, `history` and
`diff` read it), reports rewritten after every checked cell, a history row at the end; the
coverage counts head load-success.md (sweep/report.py).
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from servematrix import __version__
from servematrix.check.verdict import exit_code, judge
from servematrix.config.devices import device_profile
from servematrix.errors import ArgumentError
from servematrix.paths import cache_dir
from servematrix.record import EntryOutcome, Expected, RunSummary, ScenarioRecord, StageFailed
from servematrix.sweep import cells as cellmod
from servematrix.sweep import registry, serve, twins
from servematrix.sweep.quant import refused_on_cpu
from servematrix.sweep.report import Coverage, write_reports

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class SweepOptions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    releases: list[str]
    layouts: list[cellmod.Layout]
    quants: list[str]
    k: str | None = None
    limit: int | None = None  # at most this many checkable cells (not-checkable ones cost nothing)
    out: Path
    overwrite: bool = False
    isolated: bool = False  # one process per check (loadcheck.run) instead of a persistent worker
    timeout: float = 300.0  # s per cell (the load check; the server's start-up, when served)
    depth: str = "load"  # load: construct + load_weights; serve: then a real server and one completion
    backend: str = "local"  # local: the persistent worlds are children here; ray: Ray actors (sweep/ray_worlds.py)
    ray_address: str | None = None  # --backend ray: the cluster to join (None: start a one-node cluster here)
    twin_dir: Path | None = None  # default: the user cache (twins are rebuilt from the forge cache)


def _now() -> str:
    from servematrix.run.pipeline import now_iso

    return now_iso()


def run(opts: SweepOptions, log=sys.stderr) -> RunSummary:
    from servematrix.report import history
    from servematrix.report.files import point_latest
    from servematrix.run import rundir
    from servematrix.serve import envs

    for rel in opts.releases:
        if rel != envs.CURRENT:
            envs.declared(rel, "--vllm")
    rundir.check(opts.out, opts.overwrite)  # refused before a registry is asked (and claimed below)
    started = _now()
    pythons = {rel: _python(rel) for rel in opts.releases}
    versions = envs.versions(opts.releases[0], pythons[opts.releases[0]])
    coverage: dict[str, Coverage] = {}
    selected: list[cellmod.Cell] = []
    for rel in opts.releases:
        archs = registry.architectures(registry.probe(pythons[rel], envs.launch_env(rel)))
        coverage[rel] = Coverage(release=rel, vllm=envs.versions(rel, pythons[rel])["vllm"], registered=len(archs),
                                 forgeable=sum(a.forgeable for a in archs))
        chosen = cellmod.select(cellmod.cells(archs, opts.layouts, opts.quants, [rel]), opts.k)
        selected += _limited(chosen, opts.limit)
    if not selected:
        raise ArgumentError("-k", f"no cell matches {opts.k!r} (ids: <model_type or architecture>/<layout>-<quant>, "
                                  "e.g. llama/tp2-none; tags: forgeable, multimodal, the model_type, ...)")
    rundir.claim(opts.out, opts.overwrite)
    summary = RunSummary(matrix="sweep", run_dir=str(opts.out), host=platform.node(), vllm_version=versions["vllm"],
                         torch_version=versions["torch"], servematrix_version=__version__, started_at=started,
                         selected=[c.id for c in selected])
    print(f"sweep: {len(selected)} cells ({sum(c.arch.forgeable for c in selected)} forgeable) in "
          f"{len(opts.releases)} release(s)", file=log, flush=True)
    twin_cache: dict[str, twins.Twin] = {}
    worlds: dict[str, object] = {}
    point_latest(opts.out)
    from servematrix.run.signals import interrupts

    try:
        with interrupts():  # SIGTERM too ends the sweep as "interrupted", its workers stopped
            _cells(selected, opts, pythons, versions, summary, coverage, twin_cache, worlds, log)
        summary.status = "complete"
    except KeyboardInterrupt:
        summary.status = "interrupted"
    finally:
        for world in worlds.values():
            world.close()
        _counts(summary)
        summary.ended_at = _now()
        verdicts = [r.verdict for r in summary.scenarios]
        summary.exit_code = 2 if summary.status != "complete" and exit_code(verdicts) == 0 else exit_code(verdicts)
        write_reports(summary, coverage.values())
        db = history.append(summary)
        write_reports(summary, coverage.values(), history.trend(db))
    return summary


# Reports are rewritten as cells finish, but a rewrite costs more the more records there are (2.3 s
# at 2 000 records, measured on the 0.20.2 zoo): at most REWRITE_SHARE of the sweep's time goes to it,
# so late in a big sweep the reports lag by a few cells (a cell's log is on disk the moment it ends).
REWRITE_SHARE = 0.2


class _Rewriter:
    def __init__(self) -> None:
        self.cost, self.at = 0.0, 0.0

    def maybe(self, summary, coverage) -> None:
        now = time.monotonic()
        if now - self.at < self.cost / REWRITE_SHARE:
            return
        write_reports(summary, coverage.values())
        self.at = time.monotonic()
        self.cost = self.at - now


def _cells(selected, opts, pythons, versions, summary, coverage, twin_cache, worlds, log) -> None:
    rewrite = _Rewriter()
    for i, cell in enumerate(selected, 1):
        for done in [rel for rel in worlds if rel != cell.release]:  # releases run one after another:
            worlds.pop(done).close()  # a finished one's world frees its memory (and its Ray slot)
        record = _cell(cell, opts, pythons[cell.release], twin_cache, worlds, versions)
        summary.scenarios.append(record)
        coverage[cell.release].count(record, twin_cache.get(cell.arch.model_type or ""))
        if record.verdict != "skipped":
            print(f"[{i}/{len(selected)}] {cell.id}: {record.verdict} ({record.seconds:.1f} s)"
                  + (f" {record.failure.signature[:160]}" if record.failure else ""), file=log, flush=True)
            _counts(summary)
            rewrite.maybe(summary, coverage)


def _python(release: str) -> str:
    from servematrix.serve import envs

    envs.ensure(release)
    return envs.python(release)


def _limited(chosen: list[cellmod.Cell], limit: int | None) -> list[cellmod.Cell]:
    """Every not-checkable cell (they are recorded, never silently dropped) and the first `limit`
    forgeable ones."""
    if limit is None:
        return chosen
    out, n = [], 0
    for c in chosen:
        if c.arch.forgeable:
            if n >= limit:
                continue
            n += 1
        out.append(c)
    return out


def _counts(summary: RunSummary) -> None:
    counts: dict[str, int] = {}
    for r in summary.scenarios:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    summary.counts = counts


def _cell(cell: cellmod.Cell, opts: SweepOptions, python: str, twin_cache: dict, worlds: dict,
          versions: dict) -> ScenarioRecord:
    started, t0 = _now(), time.monotonic()
    base = dict(id=cell.id, scenario=cell.arch.key, model=cell.arch.arch, tp=cell.tp, pp=cell.pp, quant=cell.quant,
                vllm=cell.release, device="cpu", tags=cell.tags, expect=Expected(), started_at=started,
                vllm_version=versions["vllm"], torch_version=versions["torch"])
    if not cell.arch.forgeable:
        return judge(EntryOutcome(**base, seconds=0.0, skipped=f"not checkable here: {cell.arch.reason}"))
    mt = cell.arch.model_type
    if mt not in twin_cache:
        tps = sorted({lay.tp for lay in opts.layouts})
        twin_cache[mt] = twins.build(mt, opts.twin_dir or cache_dir() / "sweep-twins", max(lay.pp for lay in opts.layouts), tps)
    twin = twin_cache[mt]
    if cell.quant != "none":  # per TP: whether a tiny twin's shards hold whole FP8 blocks depends on it
        if (mt, cell.quant, cell.tp) not in twin_cache:
            twin_cache[(mt, cell.quant, cell.tp)] = twins.quantize(twin, cell.quant, [cell.tp])
        twin = twin_cache[(mt, cell.quant, cell.tp)]
    if not twin.ok:
        return judge(EntryOutcome(**base, seconds=round(time.monotonic() - t0, 2),
                                  skipped=f"not checkable here: {twin.reason} [{twin.origin}]"))
    parts = _load_check(cell, opts, python, twin, worlds)
    failure = parts.get("failure")
    if failure is not None and serve.gpu_only(failure):  # data/sweep-quants.yaml `gpu_only`
        parts = {"skipped": f"not checkable here: needs a GPU-only library ({failure.signature[:200]})",
                 "server_command": parts.get("server_command")}
    elif failure is not None and cell.quant != "none" and refused_on_cpu(cell.quant, failure.signature):
        parts = {"skipped": f"not checkable here: the CPU build has no kernel for this twin's {cell.quant} layout "
                            f"({failure.signature[:200]}; the reasons are in its server.log)",
                 "server_command": parts.get("server_command")}
    from servematrix.serve.envs import not_served

    # a release this host can only load-check (the CUDA wheel on a CPU host) says so on every cell
    why_not = not_served(cell.release)
    depth = f"depth: load (not served: {why_not})" if why_not else None
    if opts.depth == "serve" and not why_not and "skipped" not in parts and parts.get("failure") is None:
        parts, depth = _serve_step(cell, opts, python, twin, parts)
    record = judge(EntryOutcome(**base, **parts, seconds=round(time.monotonic() - t0, 2)))
    if record.verdict in ("pass", "fail"):
        record = _twin_incomplete(record, cell, opts, twin)
    if record.verdict != "skipped":  # the depth reached, the quantized layout in words (block size, family rule)
        record = record.model_copy(update={"note": "; ".join(filter(None, [record.note, depth, twin.note,
                                                                            twin.origin])) or None})
    return record


def _twin_incomplete(record, cell: cellmod.Cell, opts: SweepOptions, twin: twins.Twin):
    """The record as `twin-incomplete` where vLLM read something the twin lacks and the family's
    real checkpoints carry (sweep/incomplete.py): then it says nothing about vLLM, pass or fail."""
    import json

    from servematrix.sweep import incomplete

    check_dir = opts.out / cell.id / "loadcheck"
    try:
        twin_config = json.loads((Path(twin.path) / "config.json").read_text())
    except (OSError, ValueError):
        twin_config = {}
    lacks = incomplete.missing(cell.arch.model_type, twin_config, incomplete.rank_misses(check_dir), record.failure,
                               incomplete.rank_errors(check_dir), incomplete.config_class(check_dir))
    if not lacks:
        return record
    was = f"; the load check alone said {record.verdict}" + (f": {record.failure.signature[:200]}" if record.failure else "")
    return record.model_copy(update={"verdict": "twin-incomplete",
                                     "note": f"twin-incomplete: the twin lacks {'; '.join(lacks)}{was}"})


def _serve_step(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin, parts: dict) -> tuple[dict, str]:
    """`--depth serve` after a passing load check: the parts with the server's, and the depth in words."""
    why = serve.rules().unservable(cell.arch.model_type, cell.quant, twin.load_only)
    if why:
        return parts, f"depth: load (not served: {why})"
    served = _serve(cell, opts, python, twin)
    failure = served.get("failure")
    if failure is not None and serve.gpu_only(failure):
        return parts, f"depth: load (the server needs a GPU-only library: {failure.signature[:200]})"
    return {**parts, **served}, "depth: serve (construct, load, then a server and one greedy completion)"


def _serve(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin) -> dict:
    cell_dir = opts.out / cell.id
    return serve.serve(_spec(cell, python, twin, cell_dir, opts.timeout), cell_dir / "serve.log", opts.timeout)


def _spec(cell: cellmod.Cell, python: str, twin: twins.Twin, cell_dir: Path, timeout: float):
    from servematrix.serve import envs
    from servematrix.serve.server import LaunchSpec, cpu_bind

    argv = [python, "-m", SERVER_MODULE, "--model", twin.path, "--tensor-parallel-size", str(cell.tp),
            "--pipeline-parallel-size", str(cell.pp), *twin.server_args]
    world = cell.tp * cell.pp
    env = {**device_profile("cpu").get("env", {}), **envs.launch_env(cell.release),
           "VLLM_CPU_OMP_THREADS_BIND": cpu_bind(world) if world > 1 else "auto"}
    return LaunchSpec(argv=argv, env=env, port=0, log_path=cell_dir / "server.log", startup_timeout=timeout)


def _world(opts: SweepOptions, python: str, env: dict, directory: Path):
    """A release's persistent world: a child of this process, or a Ray actor (`--backend ray`)."""
    if opts.backend == "ray":
        from servematrix.sweep.ray_worlds import RayWorld

        return RayWorld(python, env, directory, opts.ray_address)
    from servematrix.serve.world import World

    return World(python, env, directory)


def _load_check(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin, worlds: dict) -> dict:
    from servematrix.record import LoadResult
    from servematrix.serve import loadcheck
    from servematrix.serve.world import run_check

    cell_dir = opts.out / cell.id
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec(cell, python, twin, cell_dir, opts.timeout)
    attention = (device_profile("cpu").get("load_check") or {}).get("attention", {})
    check = loadcheck.Check(attention=attention, out=cell_dir / "loadcheck", record_misses=True)
    parts: dict = {"server_command": loadcheck.shell(spec, check)}
    try:
        if opts.isolated:
            result = loadcheck.run(spec, check)
        else:
            if cell.release not in worlds:
                env = {**device_profile("cpu").get("env", {}), **spec.env}
                worlds[cell.release] = _world(opts, python, env, opts.out / ".workers" / cell.release)
            result = run_check(worlds[cell.release], spec, check)
        parts.update(load_check=result, load=LoadResult(ok=True, seconds=result.seconds))
    except StageFailed as exc:
        parts.update(failure=exc.failure, **exc.recorded)
    return parts
