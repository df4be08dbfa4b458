"""`servematrix sweep`: every architecture a release registers × layouts × quantizations, each cell
a load check of a mirrored twin (vLLM's own model construction and load_weights under the layout),
recorded as pass, fail with its signature, or not checkable here with the reason.

The sweep owns no run of its own: its cells are the work (SweepWork) of the run engine `servematrix
run` has (run/session.py over run/lifecycle.py), which claims the directory, points `latest`, plans
the jobs, hands them to the pool (dispatch.LocalPool here; with `--backend ray` the fleet of
persistent worlds), turns Ctrl-C / SIGTERM into "interrupted", writes each cell's record.json the
moment it ends, counts the verdicts, appends the history row and writes the reports; each cell goes
through the pipeline's phases (run/pipeline.py: typed Parts, the retry rule, the load-check phase in
the persistent world of the pool serve/world.py keeps, the serve phase at `--depth serve`). The run
directory is `run`'s: summary.json of ScenarioRecords (scenario = the architecture's key,
tp/pp/quant/vllm the cell's axes, so the reports' grid is the heatmap, and `gate`, `history` and
`diff` read it); the coverage counts head load-success.md (sweep/report.py).
What stays here: which cells there are (registry, cells, twins) and what a cell's result means
(not checkable here, twin-incomplete, the depth reached).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from servematrix.check.verdict import judge
from servematrix.config.devices import device
from servematrix.errors import ArgumentError
from servematrix.paths import cache_dir
from servematrix.redact import terminal
from servematrix.record import EntryOutcome, Expected, Failure, RunSummary, ScenarioRecord, StageFailed
from servematrix.run import dispatch, rundir
from servematrix.run.pipeline import Parts, interrupted, load_check_phase, now_iso, with_retries
from servematrix.sweep import cells as cellmod
from servematrix.sweep import filled, pooling, quant, registry, serve, twins, wrappers
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
    retries: int = 1  # extra attempts after an infrastructure failure (OOM, timeout), as `run --retries`
    timeout: float = 300.0  # s per cell (the load check; the server's start-up, when served)
    depth: str = "load"  # load: construct + load_weights; serve: then a real server and one completion
    backend: str = "local"  # local: the persistent worlds are children here; ray: Ray actors, several at once (run/ray_worlds.py)
    ray_address: str | None = None  # --backend ray: the cluster to join (None: start a one-node cluster here)
    twin_dir: Path | None = None  # default: the user cache (twins are rebuilt from the forge cache)


# Reports are rewritten as cells finish, but a rewrite costs more the more records there are: at
# most this share of the sweep's time goes to it (run/lifecycle.py's throttle; a cell's record.json
# and log are on disk the moment it ends).
REWRITE_SHARE = 0.2


def run(opts: SweepOptions, log=sys.stderr) -> RunSummary:
    """The sweep as one run of the run engine (run/session.py, the one `servematrix run` has): the
    directory claimed, `latest`, interrupts, each cell's record published as it ends, the history
    row and the reports (with the sweep's coverage) at the end."""
    from servematrix.run.session import Session
    from servematrix.serve import envs

    for rel in opts.releases:
        if rel != envs.CURRENT:
            envs.declared(rel, "--vllm")
    rundir.check(opts.out, opts.overwrite)  # refused before a registry is asked (and claimed by the run)
    started = now_iso()
    pythons = {rel: _python(rel) for rel in opts.releases}
    coverage: dict[str, Coverage] = {}
    selected: list[cellmod.Cell] = []
    # each release lists its registry in its own interpreter (a subprocess importing vLLM) while this
    # process imports the transformers maps the classification reads: ~7 s and ~5 s overlapped, not added
    warming = threading.Thread(target=registry.warm, name="transformers-maps", daemon=True)
    warming.start()
    registered = {rel: registry.probe(pythons[rel], envs.launch_env(rel)) for rel in opts.releases}
    warming.join()
    for rel in opts.releases:
        archs = registry.architectures(registered[rel])
        coverage[rel] = Coverage(release=rel, vllm=envs.versions(rel, pythons[rel])["vllm"], registered=len(archs),
                                 forgeable=sum(a.forgeable for a in archs), kinds=dict(Counter(a.kind for a in archs)))
        chosen = cellmod.select(cellmod.cells(archs, opts.layouts, opts.quants, [rel]), opts.k)
        selected += _limited(chosen, opts.limit)
    if not selected:
        raise ArgumentError("-k", f"no cell matches {opts.k!r} (ids: <model_type or architecture>/<layout>-<quant>, "
                                  "e.g. llama/tp2-none; tags: forgeable, multimodal, the model_type, ...)")

    def write(summary: RunSummary, trend: dict | None, pages_of) -> None:
        write_reports(summary, coverage.values(), trend, pages_of)

    work = SweepWork(opts, selected, pythons, coverage, started, log)
    print(f"sweep: {len(selected)} cells ({sum(c.arch.forgeable for c in selected)} forgeable) in "
          f"{len(opts.releases)} release(s)", file=log, flush=True)
    return Session(work, opts.out, opts.overwrite, write=write, throttle=REWRITE_SHARE).run()


class SweepWork:
    """The sweep's cells as the work of a run (run/session.py): each cell a job needing the host's
    CPU-server slot, in the sweep's order (release by release: a finished release's world goes);
    a cell that can never be checked here is recorded before anything runs; the pool is this host's
    (dispatch.LocalPool, the cells one after another through their worlds) or, with `--backend ray`,
    the fleet of persistent worlds (sweep/spread.py). A cell's outcome is judged as a matrix entry's
    (no baseline: a layout's parity is not the sweep's question) and counted in the coverage."""

    name = "sweep"
    quiet_skips = True  # thousands of not-checkable cells: each on disk at once, the pages rewritten in batches

    def __init__(self, opts: SweepOptions, cells: list[cellmod.Cell], pythons: dict[str, str],
                 coverage: dict[str, Coverage], started_at: str, log=sys.stderr):
        from servematrix.serve import envs

        self.opts, self.cells, self.pythons, self.coverage, self.log = opts, cells, pythons, coverage, log
        self.started_at, self.ids = started_at, [c.id for c in cells]
        self.cancelled = threading.Event()
        self._by_id = {c.id: c for c in cells}
        self._versions = envs.versions(opts.releases[0], pythons[opts.releases[0]])
        self.twins: dict = {}  # built once per model_type (and per quantization and TP) for the whole sweep
        self.worlds = None  # the pool's persistent worlds (_worlds), started with the run

    def versions(self) -> dict:
        return self._versions

    def jobs(self) -> list[dispatch.Job]:
        # one estimate for all: the pool keeps the sweep's order (release by release)
        return [dispatch.Job(k=k, id=c.id, host=1) for k, c in enumerate(self.cells, 1)]

    def cell(self, cell: cellmod.Cell, worlds) -> EntryOutcome:
        return _cell(cell, self.opts, self.pythons[cell.release], self.twins, worlds, self._versions, self.log)

    def unrunnable(self, job: dispatch.Job, capacity: dispatch.Capacity) -> EntryOutcome | None:
        """A cell not checkable here whatever runs it (no twin can be forged for its architecture, a
        native twin of another release): recorded before any cell runs."""
        from servematrix.serve.envs import CURRENT

        cell = self._by_id[job.id]
        if not cell.arch.forgeable or (cell.arch.native and cell.release != CURRENT):
            return self.cell(cell, None)
        return None

    def pool(self) -> dispatch.Bound:
        self.worlds = _worlds(self.opts)
        if self.opts.backend == "ray":
            return dispatch.Bound(dispatch.Capacity(host=1), self._spread)

        def execute(job: dispatch.Job, ids: list[int]) -> EntryOutcome:
            cell = self._by_id[job.id]
            self.worlds.close_others(cell.release)  # releases run one after another: a finished one's world goes
            return self.cell(cell, self.worlds)

        local = dispatch.LocalPool([])
        return dispatch.Bound(dispatch.Capacity(host=1), lambda jobs, done: local.run(jobs, execute, done))

    def records(self, outcome: EntryOutcome) -> list[tuple[ScenarioRecord, bool]]:
        record = judge(outcome)
        cell = self._by_id[outcome.id]
        self.coverage[cell.release].count(record, self.twins.get(cell.arch.key))
        return [(record, True)]

    def published(self, rec: ScenarioRecord, n: int) -> None:
        if rec.verdict == "skipped":  # not checkable: in the record and the coverage, not worth a line
            return
        where = f" on {rec.node}" if self.opts.backend == "ray" else ""
        print(f"[{n}/{len(self.cells)}] {terminal(rec.id)}: {rec.verdict} ({rec.seconds:.1f} s){where}"
              + (f" {terminal(rec.failure.signature, 160)}" if rec.failure else ""), file=self.log, flush=True)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> list[ScenarioRecord]:
        if self.worlds is not None:
            self.worlds.close()  # no worker outlives the run
        return []

    def _spread(self, jobs: list[dispatch.Job], done) -> None:
        """`--backend ray`: the twins built here first (once each; run/ray_worlds.py ships them to
        the nodes), a cell whose twin cannot be built recorded at once, the rest spread over the
        fleet's worlds (sweep/spread.py), each record published the moment its cell ends."""
        from servematrix.sweep import spread

        why_retried: dict[str, str] = {}
        job_of = {j.id: j for j in jobs}

        def publish(cell: cellmod.Cell, outcome: EntryOutcome) -> bool:
            return done(job_of[cell.id], outcome)

        def run_cell(cell: cellmod.Cell, world, attempt: int) -> EntryOutcome:
            outcome = self.cell(cell, world)
            if attempt == 1:
                return outcome
            return outcome.model_copy(update={"attempts": outcome.attempts + 1, "remarks": [
                *outcome.remarks, f"retried on another world: {why_retried.get(cell.id, 'its first world was lost')}"]})

        def retried(cell: cellmod.Cell, why: str) -> None:
            why_retried[cell.id] = why
            print(f"{terminal(cell.id)}: {terminal(why, 300)}; retrying on another world", file=self.log, flush=True)

        remote = []
        for job in jobs:
            cell = self._by_id[job.id]
            if _twin(cell, self.opts, self.twins).ok:
                remote.append(cell)
            elif not publish(cell, self.cell(cell, None)):
                return
        if not remote:
            return
        fleet, versions = self.worlds, self._versions
        worlds = fleet.start()
        print(f"sweep: {len(worlds)} world(s) on {len({w.node for w in worlds})} Ray node(s)", file=self.log, flush=True)
        spread.spread(spread.by_cost(remote, self.opts.releases), worlds, run_cell, publish,
                      lost=lambda cell, world, why: _unrun(cell, versions, world.node if world else "none", Failure(
                          kind="signal", signature=f"servematrix: {why}", infra=True, phase="load"), attempts=2),
                      interrupted=lambda cell, world: _unrun(cell, versions, world.node, interrupted()),
                      replace=fleet.replace, retried=retried)


def _unrun(cell: cellmod.Cell, versions: dict, node: str, failure: Failure, attempts: int = 1) -> EntryOutcome:
    """The outcome of a cell whose world never gave it a result (lost twice, or interrupted)."""
    return EntryOutcome(id=cell.id, scenario=cell.arch.key, tp=cell.tp, pp=cell.pp, quant=cell.quant,
                        vllm=cell.release, device="cpu", tags=cell.tags, expect=Expected(), started_at=now_iso(),
                        model=cell.arch.arch, node=node, vllm_version=versions["vllm"],
                        torch_version=versions["torch"], failure=failure, seconds=0.0, attempts=attempts)


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


def _cell(cell: cellmod.Cell, opts: SweepOptions, python: str, twin_cache: dict, worlds,
          versions: dict, log=sys.stderr) -> EntryOutcome:
    """One cell through the pipeline's phases (run/pipeline.py's typed Parts, its load-check pool
    of persistent worlds): twin, load check, then at `--depth serve` the serve phase; then what the
    load check's files say of the twin (incomplete, never filled, the head, the class a wrapper
    built) into the outcome, which check.verdict.judge turns into the record as a matrix entry's."""
    started, t0 = now_iso(), time.monotonic()
    identity = dict(id=cell.id, scenario=cell.arch.key, tp=cell.tp, pp=cell.pp, quant=cell.quant, vllm=cell.release,
                    device="cpu", tags=cell.tags, expect=Expected(), started_at=started)
    parts = Parts(model=cell.arch.arch, vllm_version=versions["vllm"], torch_version=versions["torch"])

    def outcome(failure=None, skipped=None, attempts=1) -> EntryOutcome:
        seconds = round(time.monotonic() - t0, 2) if cell.arch.forgeable else 0.0
        return EntryOutcome(**identity, **vars(parts), failure=failure, skipped=skipped, seconds=seconds,
                            attempts=attempts)

    if not cell.arch.forgeable:
        return outcome(skipped=f"not checkable here: {cell.arch.reason}")
    from servematrix.serve.envs import CURRENT

    if cell.arch.native and cell.release != CURRENT:
        # its tensor names are the current release's class's (sweep/native.py): another release's class may
        # read others, and a cell failing on that would be the twin's fault
        return outcome(skipped="not checkable here: a native twin's layout is derived from the current release's "
                               "vLLM class only")
    twin = _twin(cell, opts, twin_cache)
    if not twin.ok:
        return outcome(skipped=f"not checkable here: {twin.reason} [{twin.origin}]")
    depth: str | None = None

    def attempt(n: int) -> EntryOutcome:  # the load check, then (--depth serve) the serve phase
        nonlocal parts, depth
        parts = Parts(model=cell.arch.arch, vllm_version=versions["vllm"], torch_version=versions["torch"])
        try:
            return checked(n)
        except KeyboardInterrupt:  # as the pipeline records an entry it was running: interrupted
            return outcome(failure=interrupted(), attempts=n)

    def checked(n: int) -> EntryOutcome:
        nonlocal parts, depth
        failure = _load_check(cell, opts, python, twin, worlds, parts)
        why_skip = _not_checkable(cell, failure)
        if why_skip:  # the load check's results say nothing about vLLM here: only its command line stays
            parts = Parts(model=parts.model, node=parts.node, vllm_version=parts.vllm_version,
                          torch_version=parts.torch_version, server_command=parts.server_command)
            return outcome(skipped=why_skip, attempts=n)
        from servematrix.serve.envs import not_served

        # a release this host can only load-check (the CUDA wheel on a CPU host) says so on every cell
        why_not = not_served(cell.release)
        depth = f"depth: load (not served: {why_not})" if why_not else None
        if opts.depth == "serve" and not why_not and failure is None:
            failure, depth = _serve_step(cell, opts, python, twin, parts)
        return outcome(failure=failure, attempts=n)

    def retrying(f: Failure) -> None:
        print(f"{terminal(cell.id)}: infrastructure failure ({f.kind}: {terminal(f.signature, 160)}), retrying",
              file=log, flush=True)

    out = with_retries(attempt, opts.retries, retrying=retrying)
    if out.skipped is not None:
        return out
    update: dict = {}
    head = None
    if out.failure is None or not out.failure.infra:  # checked: what the load check's files say of the twin
        update["incomplete"] = _twin_incomplete(cell, opts, twin, out.failure)
    if out.failure is None and update["incomplete"] is None:
        unfilled = _unfilled(cell, opts, twin)
        head = _head_note(cell, opts, twin, unfilled)
        if unfilled:  # a parameter never filled is no pass: vLLM's own check exempts every unquantized linear
            update["failure"] = Failure.of(
                "check", f"servematrix: vLLM built and never filled from the checkpoint: {', '.join(unfilled)}"[:500])
        elif cell.arch.wrapper:  # the wrapper itself, or the cell checked another class
            other = wrappers.built(cell.arch.arch, opts.out / cell.id / "loadcheck")
            if other:
                return out.model_copy(update={"skipped": (
                    f"not checkable here: with {' '.join(wrappers.ARGS)} vLLM built {other}, not {cell.arch.arch}")})
            head = "; ".join(filter(None, [f"Transformers backend: vLLM built {cell.arch.arch}", head]))
    # the depth reached, the quantized layout in words (block size, family rule)
    update["remarks"] = [r for r in (depth, head, twin.note, twin.origin) if r]
    return out.model_copy(update=update)


def _twin(cell: cellmod.Cell, opts: SweepOptions, twin_cache: dict) -> twins.Twin:
    """The cell's twin, built once per model_type (and per quantization and TP) for the whole sweep."""
    mt = cell.arch.key  # the model_type; a pooling architecture's own name (its twin is its class)
    where, tps = opts.twin_dir or cache_dir() / "sweep-twins", sorted({lay.tp for lay in opts.layouts})
    max_pp = max(lay.pp for lay in opts.layouts)
    if mt not in twin_cache:
        twin_cache[mt] = twins.build(mt, where, max_pp, tps)
    twin = twin_cache[mt]
    if cell.quant != "none":  # per TP: whether a tiny twin's shards hold whole FP8 blocks depends on it
        def wide(units: dict[str, int]) -> twins.Twin:  # too narrow for the layout: as wide as real checkpoints
            key = (mt, "wide", tuple(sorted(units.items())))
            if key not in twin_cache:
                twin_cache[key] = twins.build(mt, where, max_pp, tps, align=units)
            return twin_cache[key]

        if (mt, cell.quant, cell.tp) not in twin_cache:
            twin_cache[(mt, cell.quant, cell.tp)] = twins.quantize(twin, cell.quant, [cell.tp], wide)
        twin = twin_cache[(mt, cell.quant, cell.tp)]
    return twin


def _not_checkable(cell: cellmod.Cell, failure: Failure | None) -> str | None:
    """Why a load check's failure is no verdict on vLLM here (None: it is one)."""
    declared = serve.declared_limit(failure, cell.arch.arch) if failure is not None else None
    if declared:  # vLLM's own refusal of the layout for this class: what every user gets, not a defect
        return declared
    if failure is not None and serve.gpu_only(failure):  # data/sweep-quants.yaml `gpu_only`
        return f"not checkable here: needs a library this CPU install lacks ({failure.signature[:200]})"
    if failure is not None and cell.quant != "none" and quant.refused_on_cpu(cell.quant, failure.signature):
        return (f"not checkable here: the CPU build has no kernel for this twin's {cell.quant} layout "
                f"({failure.signature[:200]}; the reasons are in its server.log)")
    return None


def _composite(twin: twins.Twin) -> bool:
    return bool(twin.spec and twin.spec.get("components") and twin.path is not None)


def _unfilled(cell: cellmod.Cell, opts: SweepOptions, twin: twins.Twin) -> list[str]:
    """The parameters vLLM built and never filled from the twin, at TP=1 where every parameter is
    whole: a composite's by sweep/multimodal.py's unread_params, any other unquantized cell's by
    sweep/filled.py (stacks and vLLM's transforms known), a draft cell's target's and draft's
    (sweep/drafts.py unread_params); [] at TP > 1 and for quantized twins, whose
    weights vLLM repacks after loading, but for the KV-cache scales a twin writes on every attention
    layer (fp8-kv), whose loss no error reports, at every TP."""
    if twin.path is None:
        return []
    check_dir = opts.out / cell.id / "loadcheck"
    if cell.quant != "none" and quant.rules()[cell.quant].kv_scales:  # at any TP: each rank's scales are whole
        return [f"KV-cache scale {n}" for n in filled.unloaded_kv_scales(check_dir)]
    if cell.tp > 1:
        return []
    if _composite(twin):
        from servematrix.sweep import multimodal

        return multimodal.unread_params(Path(twin.path), check_dir)
    if cell.quant != "none":
        return []
    if twin.draft is not None:  # the target's parameters and, as vLLM's proposer leaves them, the draft's
        from servematrix.sweep import drafts

        target = drafts.rules().drafts[cell.arch.key].target
        return (filled.unfilled([cell.arch.key, target], Path(twin.path), check_dir)
                + [f"draft {n}" for n in drafts.unread_params(cell.arch.key, Path(twin.path), check_dir)])
    return filled.unfilled([cell.arch.key], Path(twin.path), check_dir)


def _head_note(cell: cellmod.Cell, opts: SweepOptions, twin: twins.Twin, unfilled: list[str]) -> str | None:
    """A pooling cell's head (classifier, score, projection) in words: which of the twin's head
    tensors a rank holds bit for bit (sweep/pooling.py). A pass says vLLM built and loaded the
    model; this says whether the head came from the checkpoint. At TP > 1 a split head holds slices,
    which whole-tensor digests cannot match: not compared."""
    if twin.draft is not None and twin.path is not None:  # a draft's: what vLLM built and loaded of it
        from servematrix.sweep import drafts

        return drafts.note(cell.arch.key, Path(twin.path), opts.out / cell.id / "loadcheck", cell.tp)
    if _composite(twin):  # a multimodal composite's
        from servematrix.sweep import multimodal

        return multimodal.note(Path(twin.path), opts.out / cell.id / "loadcheck", cell.tp, unfilled)
    if twin.architecture is None or twin.path is None or cell.tp > 1:
        return None
    heads = [h for h in pooling.head_loaded(Path(twin.path), opts.out / cell.id / "loadcheck") if h.distinctive]
    if not heads:
        return None
    missing = [h.name for h in heads if not h.loaded]
    return (f"head: {len(heads) - len(missing)} of {len(heads)} tensors loaded bit for bit"
            + (f", not found on any rank: {', '.join(missing)}" if missing else ""))


def _twin_incomplete(cell: cellmod.Cell, opts: SweepOptions, twin: twins.Twin, failure: Failure | None) -> str | None:
    """What the twin lacks that vLLM read and the family's real checkpoints carry (sweep/incomplete.py),
    in words; None where it lacks nothing. Such a cell says nothing about vLLM, pass or fail."""
    import json

    from servematrix.sweep import incomplete

    check_dir = opts.out / cell.id / "loadcheck"
    try:
        twin_config = json.loads((Path(twin.path) / "config.json").read_text())
    except (OSError, ValueError):
        twin_config = {}
    lacks = incomplete.missing(cell.arch.model_type, twin_config, incomplete.rank_misses(check_dir), failure,
                               incomplete.rank_errors(check_dir), incomplete.config_class(check_dir))
    if cell.quant != "none" and failure is None:
        if scales := filled.unloaded_scales(check_dir):  # a float weight cast into an FP8 layer: no pass
            lacks.append(f"FP8 scales for linears vLLM built in FP8 and the twin holds in float, never loaded "
                         f"({', '.join(scales[:4])}{' …' if len(scales) > 4 else ''}): a published checkpoint of the layout "
                         "would say whether it quantizes them or names them as not converted")
    return "; ".join(lacks) if lacks else None


def _serve_step(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin,
                parts) -> tuple[Failure | None, str]:
    """`--depth serve` after a passing load check: the server's results into `parts` (its failure
    returned), and the depth in words."""
    why = serve.rules().unservable(cell.arch.model_type, cell.quant, twin.load_only) or \
        (pooling.unserved(cell.arch.kind) if cell.arch.pooling else None)
    if why:
        return None, f"depth: load (not served: {why})"
    embed_dim = _width(twin) if cell.arch.pooling else None  # an embedding model's vectors: the twin's width
    served, failure = _serve(cell, opts, python, twin, embed_dim)
    if failure is not None and serve.gpu_only(failure):
        return None, f"depth: load (the server needs a library this CPU install lacks: {failure.signature[:200]})"
    for name in ("load", "smoke", "embedding"):  # the server's start-up time replaces the load check's
        if getattr(served, name) is not None:
            setattr(parts, name, getattr(served, name))
    asked = "one /v1/embeddings request" if embed_dim is not None else "one greedy completion"
    return failure, f"depth: serve (construct, load, then a server and {asked})"


def _width(twin: twins.Twin) -> int | None:
    """The twin's hidden size (its config's `hidden` role): an embedding model's vector width."""
    from servematrix.mirror.layout import field_value

    return field_value((twin.spec or {}).get("config") or {}, "hidden")[1]


def _serve(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin, embed_dim: int | None = None):
    cell_dir = opts.out / cell.id
    return serve.serve(_spec(cell, python, twin, cell_dir, opts.timeout), cell_dir / "serve.log", opts.timeout,
                       embed_dim=embed_dim)


def _spec(cell: cellmod.Cell, python: str, twin: twins.Twin, cell_dir: Path, timeout: float):
    from servematrix.serve import envs
    from servematrix.serve.server import LaunchSpec, omp_bind

    argv = [python, "-m", SERVER_MODULE, "--model", twin.path, "--tensor-parallel-size", str(cell.tp),
            "--pipeline-parallel-size", str(cell.pp), *twin.server_args]
    world = cell.tp * cell.pp
    env = {**device("cpu").env, **envs.launch_env(cell.release),
           "VLLM_CPU_OMP_THREADS_BIND": omp_bind(world)}
    return LaunchSpec(argv=argv, env=env, port=0, log_path=cell_dir / "server.log", startup_timeout=timeout)


def _worlds(opts: SweepOptions):
    """The sweep's pool of persistent worlds: one per release, children of this process (the pool
    the pipeline's load checks use), or with `--backend ray` a fleet of Ray actors, one per
    CPU-server slot of the cluster (run/ray_worlds.py; started by the first cell that needs one)."""
    if opts.backend == "ray":
        from servematrix.run.ray_worlds import RayFleet

        return RayFleet(opts.ray_address)
    from servematrix.serve.world import Worlds

    return Worlds(opts.out / ".workers")


def _load_check(cell: cellmod.Cell, opts: SweepOptions, python: str, twin: twins.Twin, worlds, parts) -> Failure | None:
    """The pipeline's load-check phase into `parts`: its failure, or None when it passed."""
    from servematrix.serve import loadcheck

    cell_dir = opts.out / cell.id
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec(cell, python, twin, cell_dir, opts.timeout)
    cpu = device("cpu")
    attention = cpu.attention()
    check = loadcheck.Check(attention=attention, out=cell_dir / "loadcheck", record_misses=True,
                            draft=twin.draft is not None, config_types=twin.config_types)
    world_env = {**cpu.env, **spec.env}
    # a Ray world names the node it ran on (run/ray_worlds.py); a local one runs here
    parts.node = getattr(worlds, "node", None) or parts.node
    try:
        load_check_phase(None if opts.isolated else worlds, cell.release, spec, check, world_env, parts)
    except StageFailed as exc:
        for name, value in exc.recorded.items():
            setattr(parts, name, value)
        return exc.failure
    return None
