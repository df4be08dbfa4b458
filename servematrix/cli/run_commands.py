"""The commands that read matrices and run their scenarios: validate, list, run, repro, bisect.

Each `add_*` declares one subcommand's arguments beside the `cmd_*` that carries it out. Imports of
the product stay inside the functions: `servematrix --help` must not load the whole package."""

from __future__ import annotations

from pathlib import Path

from servematrix.cli.args import finite_positive_float, gpu_ids, interpreter, non_negative_int, out_dir, port, \
    positive_int
from servematrix.errors import ArgumentError, ConfigError

DEFAULT_MATRIX = Path("matrix/cpu-smoke.yaml")
LOG_LINE = 2_000  # characters of one printed log line: a traceback's fit, a runaway line is cut
_FILTER_HELP = "filter: substring or glob of the id, tag:NAME; comma = or"


def _matrices(paths: list[str]):
    from servematrix.config.matrix import validate_files

    return validate_files([Path(p) for p in paths])


def _default_out(prefix: str = "") -> Path:
    """reports/<prefix><timestamp>: where a run (or bisect) goes without --out."""
    from datetime import datetime  # only a command that writes needs the clock: --help stays fast

    return Path("reports") / f"{prefix}{datetime.now():%Y%m%d-%H%M%S}"


def _find_entry(entry_id: str, matrix_path: str | None):
    """The matrix and entry with id `entry_id`, from `matrix_path` or else any of matrix/*.yaml."""
    candidates = [Path(matrix_path)] if matrix_path else sorted(Path("matrix").glob("*.yaml"))
    for m in _matrices([str(p) for p in candidates]):
        for e in m.entries:
            if e.id == entry_id:
                return m, e
    where = matrix_path or "matrix/*.yaml"
    raise ConfigError(where, None, None, f"no scenario with id {entry_id!r}")


def _entry(args):
    return _find_entry(args.id, args.matrix)


def add_validate(sub) -> None:
    v = sub.add_parser("validate", help="check matrix files (and the scenarios they name) without running")
    v.add_argument("matrix", nargs="+")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    for m in _matrices(args.matrix):
        print(f"{m.path}: ok ({len(m.entries)} scenarios)")
        # what each accuracy check can see with the questions it is given (one-sided, at its α, β)
        for line in m.power_lines():
            print(f"  {line}")
    return 0


def add_list(sub) -> None:
    ls = sub.add_parser("list", help="print the expanded scenario ids")
    ls.add_argument("matrix", nargs="+")
    ls.add_argument("-k", help=_FILTER_HELP)
    ls.add_argument("-v", "--verbose", action="store_true")
    ls.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from servematrix.config.expand import select
    from servematrix.redact import terminal

    for m in _matrices(args.matrix):
        for e in select(m.entries, args.k):
            exp = e.expectation
            # the reason is the user's free text: a scenario's credential written there is masked
            extra = f"  [xfail: {terminal(exp.reason, None)}]" if exp.expect == "xfail" else ""
            print(f"{e.id}{extra}" if not args.verbose
                  else f"{e.id}\t{terminal(','.join(e.tags), None)}\t{terminal(e.origin, None)}{extra}")
    return 0


def add_run(sub) -> None:
    r = sub.add_parser("run", help="run a matrix against real vLLM servers")
    r.add_argument("matrix", nargs="?", default=str(DEFAULT_MATRIX))
    r.add_argument("--out", type=out_dir, help="run directory (default reports/<timestamp>); refused if it holds a run")
    r.add_argument("--overwrite", action="store_true", help="--out may already hold a run: write over its reports")
    r.add_argument("-k", help=_FILTER_HELP)
    r.add_argument("--limit", type=positive_int, help="gsm8k questions per scenario (overrides the matrix)")
    r.add_argument("--no-gsm8k", action="store_true")
    r.add_argument("--backend", default="local", choices=["local", "docker", "ray"],
                   help="local processes, containers through the Docker API, or Ray tasks over a cluster")
    r.add_argument("--gpus", type=gpu_ids, help="GPU ids this host may hand out, e.g. 0,1,2,3 (default: every visible GPU)")
    r.add_argument("--ray-address", help="--backend ray: the cluster to join (default: start one here)")
    r.add_argument("--docker-image", help="--backend docker: image with vLLM and servematrix "
                   "(default servematrix/vllm-openai-cpu:v0.32.0, see docker/build-cpu-base.sh); engine: DOCKER_HOST")
    r.add_argument("--docker-python", default="python3", help="--backend docker: the image's interpreter")
    r.add_argument("--docker-mount", action="append", default=[], metavar="HOST:CONTAINER[:ro]")
    r.add_argument("--docker-network", default="host", choices=["host", "bridge"])
    r.add_argument("--python", type=interpreter, help="interpreter with vLLM and lm-eval (default: this one)")
    r.add_argument("--startup-timeout", type=finite_positive_float, help="seconds (default: the matrix's)")
    r.add_argument("--retries", type=non_negative_int, default=1, help="extra attempts after an infrastructure failure")
    r.add_argument("--inject", action="append", metavar="FIX",
                   help="enable a fix module (e.g. the inject-scale fault) in every scenario; ids unchanged")
    r.set_defaults(func=cmd_run)


def _selected(args, matrix) -> list:
    """The entries -k picks; none at all is an error, and which one depends on whether -k was given."""
    from servematrix.config.expand import select

    entries = select(matrix.entries, args.k)
    if not entries:
        if args.k is None:
            raise ConfigError(args.matrix, None, None, "expands to no scenario")
        raise ArgumentError("-k", f"no scenario of {args.matrix} matches {args.k!r} "
                                  f"(`servematrix list {args.matrix}` prints the ids)")
    return entries


def _check_injects(names: list[str]) -> None:
    """Every --inject names a known fix, checked before the first server starts."""
    if not names:
        return
    import servematrix_fixes

    for name in names:
        if name not in servematrix_fixes.REGISTRY:
            raise ConfigError("--inject", None, None, f"unknown fix {name!r} (available: "
                              f"{', '.join(servematrix_fixes.names())})")


def _docker_config(args):
    from servematrix.serve.docker import DockerConfig

    return DockerConfig(python=args.docker_python, mounts=args.docker_mount, network=args.docker_network,
                        **({"image": args.docker_image} if args.docker_image else {}))


def cmd_run(args) -> int:
    from servematrix.redact import terminal
    from servematrix.run.options import RunOptions
    from servematrix.run.session import Session

    (matrix,) = _matrices([args.matrix])
    entries = _selected(args, matrix)
    if args.limit:
        matrix.check_power(args.limit, entries)
    out = Path(args.out) if args.out else _default_out()
    _check_injects(args.inject)
    opts = RunOptions.of(out.resolve(), args.backend, docker=_docker_config(args),
                         gpus=args.gpus, ray_address=args.ray_address, overwrite=args.overwrite, python=args.python,
                         gsm8k_limit=args.limit, gsm8k=not args.no_gsm8k, startup_timeout=args.startup_timeout,
                         retries=args.retries, inject=tuple(args.inject or ()))
    summary = Session.of(matrix, entries, opts).run()
    print(f"\n{summary.status}: " + ", ".join(f"{k} {v}" for k, v in summary.counts.items()))
    print(f"reports: {terminal(out, None)}/summary.json, load-success.md, accuracy.md, junit.xml")
    return summary.exit_code if summary.exit_code is not None else 2


def add_repro(sub) -> None:
    rp = sub.add_parser("repro", help="print (or --exec) the commands that reproduce one scenario")
    rp.add_argument("id")
    rp.add_argument("--matrix", help="matrix file (default: search matrix/*.yaml)")
    rp.add_argument("--exec", action="store_true", help="run that one scenario")
    rp.add_argument("--compose", action="store_true", help="print a `docker compose` command instead")
    rp.add_argument("--out", type=out_dir)
    rp.add_argument("--port", type=port, default=8000)
    rp.add_argument("--limit", type=positive_int)
    rp.add_argument("--python")
    rp.set_defaults(func=cmd_repro)


def cmd_repro(args) -> int:
    from servematrix.checkpoint.resolve import resolve
    from servematrix.run.repro import compose_command, repro_script

    matrix, entry = _entry(args)
    if args.exec:
        from servematrix.run.options import RunOptions  # only --exec runs: printing needs no session
        from servematrix.run.session import Session

        out = Path(args.out) if args.out else _default_out()
        opts = RunOptions.of(out.resolve(), python=args.python, gsm8k_limit=args.limit)
        return Session.of(matrix, [entry], opts).run().exit_code or 0
    scenario = matrix.scenario(entry.scenario)
    model_path = resolve(scenario, matrix.store.directory, build=False)  # prints only: nothing forged
    if args.compose:
        print(compose_command(entry, scenario, model_path, args.port))
        return 0
    limit = args.limit or matrix.spec.gsm8k.limit or scenario.gsm8k.limit
    print(repro_script(entry, scenario, model_path, args.port, args.python or "python", limit))
    return 0


def add_bisect(sub) -> None:
    b = sub.add_parser("bisect", help="find the adjacent vLLM releases where a scenario's outcome changes")
    b.add_argument("id")
    b.add_argument("--between", nargs=2, required=True, metavar=("LOW", "HIGH"),
                   help="releases or versions (e.g. 0.18.1 0.34.0): every version the registry publishes in between is a candidate")
    b.add_argument("--matrix", help="matrix file (default: search matrix/*.yaml)")
    b.add_argument("--signature", help="regex a failure must match to count as bad (default: the entry's xfail signature)")
    b.add_argument("--out", type=out_dir, help="bisect directory (default reports/bisect-<timestamp>); refused if it holds one")
    b.add_argument("--overwrite", action="store_true", help="--out may already hold a bisect: write over it")
    b.add_argument("--python", type=interpreter)
    b.add_argument("--log-lines", type=non_negative_int, default=15)
    b.set_defaults(func=cmd_bisect)


def cmd_bisect(args) -> int:
    from servematrix.files import atomic_write
    from servematrix.redact import terminal
    from servematrix.run.bisect import bisect
    from servematrix.sweep.bisect import bisect_cell, parse

    # a sweep cell id (told apart by its form: sweep/bisect.py) is bisected by one-cell sweeps
    cell = None if getattr(args, "matrix", None) else parse(args.id)
    out = Path(args.out) if args.out else _default_out("bisect-")
    if cell is not None:
        entry = cell
        result = bisect_cell(cell, args.between[0], args.between[1], out, args.signature, args.overwrite)
    else:
        matrix, entry = _entry(args)
        result = bisect(matrix, entry, args.between[0], args.between[1], out, args.signature, args.python,
                        args.overwrite)
    # ids, releases, signatures and log lines come from files and the server's output: every one
    # goes through redact.terminal (escaped, masked, bounded) before it reaches the terminal
    print(f"\nbisect {terminal(entry.id)} over {', '.join(terminal(r) for r in result.releases)}")
    for p in sorted(result.probes, key=lambda p: result.releases.index(p.release)):
        print(f"  {terminal(p.release, 40):<12} {p.outcome:<5} {terminal(p.verdict, 20):<6} {terminal(p.signature or '')}")
    atomic_write(out / "bisect.json", result.model_dump_json(indent=2))
    if result.pair is None:
        print("no change of outcome between the releases that could be judged")
        return 1
    _print_change(result, args.log_lines)
    print(f"\n{terminal(out / 'bisect.json', None)}")
    return 0


def _print_change(result, log_lines: int) -> None:
    """The adjacent pair where the outcome changes, each with its failure and the tail of its log."""
    from servematrix.redact import terminal

    a, b = result.pair
    what = "regression: last good / first bad" if result.change == "regression" else "fix: last bad / first good"
    print(f"\n{what}: {terminal(a.release, 40)} -> {terminal(b.release, 40)}")
    for p in (a, b):
        print(f"\n--- {terminal(p.release, 40)} ({p.outcome}, vLLM {terminal(p.vllm_version, 40)}): "
              f"{terminal(p.log, None)}")
        if p.signature:
            print(f"failure: {terminal(p.signature)}")
        if p.log:
            lines = Path(p.log).read_text(errors="replace").splitlines()
            # a log line is the server's: as long as it is (a traceback's), but escaped and masked
            print("\n".join(terminal(line, LOG_LINE) for line in lines[-log_lines:]))
