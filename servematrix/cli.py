"""The `servematrix` command line. Exit codes: 0 every scenario met its expectation, 1 a
scenario did not (regression), 2 configuration or infrastructure error (nothing judged)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

from servematrix.errors import ArgumentError, ConfigError, StateError, UserError  # noqa: F401

DEFAULT_MATRIX = Path("matrix/cpu-smoke.yaml")


# --- argument types: each says what it accepts; argparse turns the refusal into one line, exit 2
def _checked(parse, ok, accepted: str):
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return convert


positive_int = _checked(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number >= 0")
port = _checked(int, lambda v: 1 <= v <= 65535, "a TCP port from 1 to 65535")
unit_interval = _checked(float, lambda v: math.isfinite(v) and 0 <= v <= 1, "a rate from 0 to 1, e.g. 0.95")
finite_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0")


def _gpu_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(text)
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise ValueError(text)
    return ids


gpu_ids = _checked(_gpu_list, lambda v: True, "GPU ids >= 0, comma-separated, each once (e.g. 0,1,2,3)")
out_dir = _checked(str, bool, "a directory path")  # '' would be the current directory
interpreter = _checked(str, lambda v: shutil.which(v) is not None, "an executable Python interpreter (a path or "
                                                                  "a name on PATH)")


class _Parser(argparse.ArgumentParser):
    """argparse whose refusals are ArgumentErrors like every other: one line and exit 2 in main
    (instead of argparse's usage block)."""

    def error(self, message: str):
        raise ArgumentError(self.prog, f"{message} (see {self.prog} --help)")


def _matrices(paths: list[str]):
    from servematrix.config.matrix import validate_files

    return validate_files([Path(p) for p in paths])


def cmd_validate(args) -> int:
    for m in _matrices(args.matrix):
        print(f"{m.path}: ok ({len(m.entries)} scenarios)")
    return 0


def cmd_list(args) -> int:
    from servematrix.config.matrix import select

    for m in _matrices(args.matrix):
        for e in select(m.entries, args.k):
            exp = e.expectation
            extra = f"  [xfail: {exp.reason}]" if exp.expect == "xfail" else ""
            print(f"{e.id}{extra}" if not args.verbose else f"{e.id}\t{','.join(e.tags)}\t{e.origin}{extra}")
    return 0


def _default_out() -> Path:
    return Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_run(args) -> int:
    from servematrix.config.matrix import select
    from servematrix.run.session import RunOptions, Runner

    (matrix,) = _matrices([args.matrix])
    entries = select(matrix.entries, args.k)
    if not entries:
        if args.k is None:
            raise ConfigError(args.matrix, None, None, "expands to no scenario")
        raise ArgumentError("-k", f"no scenario of {args.matrix} matches {args.k!r} "
                                  f"(`servematrix list {args.matrix}` prints the ids)")
    if args.limit:
        matrix.check_power(args.limit, entries)
    out = Path(args.out) if args.out else _default_out()
    for name in args.inject or []:
        import servematrix_fixes

        if name not in servematrix_fixes.REGISTRY:
            raise ConfigError("--inject", None, None, f"unknown fix {name!r} (available: "
                              f"{', '.join(servematrix_fixes.names())})")
    from servematrix.serve.docker import DockerConfig

    docker = DockerConfig(python=args.docker_python, mounts=args.docker_mount, network=args.docker_network,
                          **({"image": args.docker_image} if args.docker_image else {}))
    opts = RunOptions(out_dir=out.resolve(), backend=args.backend, python=args.python, gpus=args.gpus,
                      ray_address=args.ray_address, docker=docker,
                      gsm8k_limit=args.limit, gsm8k=not args.no_gsm8k, startup_timeout=args.startup_timeout,
                      retries=args.retries, inject=args.inject or [], overwrite=args.overwrite)
    summary = Runner(matrix, entries, opts).run()
    print(f"\n{summary.status}: " + ", ".join(f"{k} {v}" for k, v in summary.counts.items()))
    print(f"reports: {out}/summary.json, load-success.md, accuracy.md, junit.xml")
    return summary.exit_code if summary.exit_code is not None else 2


def _find_entry(entry_id: str, matrix_path: str | None):
    candidates = [Path(matrix_path)] if matrix_path else sorted(Path("matrix").glob("*.yaml"))
    for m in _matrices([str(p) for p in candidates]):
        for e in m.entries:
            if e.id == entry_id:
                return m, e
    where = matrix_path or "matrix/*.yaml"
    raise ConfigError(where, None, None, f"no scenario with id {entry_id!r}")


def cmd_repro(args) -> int:
    from servematrix.check import gsm8k
    from servematrix.serve.server import build_spec
    from servematrix.checkpoint.resolve import resolve
    from servematrix.run.session import RunOptions, Runner

    matrix, entry = _find_entry(args.id, args.matrix)
    if args.exec:
        out = Path(args.out) if args.out else _default_out()
        opts = RunOptions(out_dir=out.resolve(), python=args.python, gsm8k_limit=args.limit)
        return Runner(matrix, [entry], opts).run().exit_code or 0
    scenario = matrix.scenario(entry.scenario)
    model_path = resolve(scenario, matrix.store.directory, build=False)  # prints only: nothing forged
    if args.compose:
        print(compose_command(entry, scenario, model_path, args.port))
        return 0
    spec = build_spec(entry, scenario, model_path, args.port, Path("server.log"), args.python or "python")
    limit = args.limit or matrix.spec.gsm8k.limit or scenario.gsm8k.limit
    out = Path("repro-gsm8k")
    # what is printed is meant to be pasted: comments are one line each (a reason holding a newline
    # would start a command), commands quoted word by word, and no secret appears in either
    from servematrix.redact import one_line, shell_command

    exp = entry.expectation
    waiver = f" — {exp.reason} {exp.bug}" if exp.expect == "xfail" else ""
    lm_eval = gsm8k.command(spec.base_url, scenario.model_name, scenario.gsm8k, limit, out, args.python or "python")
    print("\n".join([
        "# " + one_line(f"servematrix repro {entry.id}   (from {entry.origin})"),
        "# " + one_line(f"expect: {exp.expect}{waiver}"),
        "# " + one_line(f"model: {model_path}"),
        "",
        f"# 1. start the server (healthy when `curl -s localhost:{args.port}/health` answers 200):",
        spec.shell(),
        "",
        "# 2. gsm8k through lm-eval (writes the task file, then runs it):",
        shell_command(["servematrix", "gsm8k-task", str(out), "--num-fewshot", str(scenario.gsm8k.num_fewshot)]),
        shell_command(lm_eval, gsm8k.OFFLINE_ENV),
    ]))
    return 0


def cmd_bisect(args) -> int:
    from servematrix.run.bisect import bisect

    matrix, entry = _find_entry(args.id, args.matrix)
    out = Path(args.out) if args.out else Path("reports") / f"bisect-{datetime.now():%Y%m%d-%H%M%S}"
    result = bisect(matrix, entry, args.between[0], args.between[1], out, args.signature, args.python,
                    args.overwrite)
    print(f"\nbisect {entry.id} over {', '.join(result.releases)}")
    for p in sorted(result.probes, key=lambda p: result.releases.index(p.release)):
        print(f"  {p.release:<12} {p.outcome:<5} {p.verdict:<6} {p.signature or ''}")
    from servematrix.report import atomic_write

    atomic_write(out / "bisect.json", result.model_dump_json(indent=2))
    if result.pair is None:
        print("no change of outcome between the releases that could be judged")
        return 1
    a, b = result.pair
    what = "regression: last good / first bad" if result.change == "regression" else "fix: last bad / first good"
    print(f"\n{what}: {a.release} -> {b.release}")
    for p in (a, b):
        print(f"\n--- {p.release} ({p.outcome}, vLLM {p.vllm_version}): {p.log}")
        if p.signature:
            print(f"failure: {p.signature}")
        if p.log:
            lines = Path(p.log).read_text(errors="replace").splitlines()
            print("\n".join(lines[-args.log_lines:]))
    print(f"\n{out / 'bisect.json'}")
    return 0


def compose_variables(entry, scenario, model_path: str, port: int) -> dict[str, str]:
    """The docker-compose.yml variables that reproduce one entry (see the file's header)."""
    from servematrix.paths import cache_dir

    cache = cache_dir()
    model = model_path
    if Path(model_path).is_relative_to(cache):  # forged/converted checkpoints live in the cache
        model = "/cache/" + str(Path(model_path).relative_to(cache))
    from servematrix.redact import redact_argv, redact_text

    # printed for pasting: credentials given in the args are masked here, where they are still
    # words of an argv (compose_command masks the rest of each value)
    variables = {
        "MODEL": redact_text(model), "TP": str(entry.tp), "PP": str(entry.pp), "PORT": str(port),
        "QUANT_ARGS": shlex.join(redact_argv(scenario.quants[entry.quant].args)),
        "SERVER_ARGS": shlex.join(redact_argv(scenario.server.args)),
        "FIXES": ",".join(entry.fixes), "CACHE": str(cache),
    }
    if entry.device == "gpu":
        variables["GPUS"] = str(entry.tp * entry.pp)
    elif entry.tp * entry.pp > 1:
        from servematrix.serve.server import cpu_bind

        variables["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(entry.tp * entry.pp)
    return variables


def compose_command(entry, scenario, model_path: str, port: int) -> str:
    from servematrix.redact import one_line, shell_command

    service = "vllm-gpu" if entry.device == "gpu" else "vllm-cpu"
    variables = compose_variables(entry, scenario, model_path, port)
    # names checked, values quoted and redacted: the line is safe to paste
    command = shell_command(["docker", "compose", "--profile", service.split("-")[1], "up", service], variables)
    return ("# " + one_line(f"{entry.id}: the server in a container (build once with the same variables and `build`)")
            + "\n" + command)


def cmd_mirror(args) -> int:
    from servematrix import mirror

    if args.diff:
        text, equal = mirror.cli_diff(args.source, args.diff)
        print(text)
        return 0 if equal else 1
    if not args.out:
        raise ArgumentError("--out", "needed: the scenario file to write, e.g. scenarios/NAME.yaml")
    name = args.name or Path(args.out).stem
    print(mirror.cli_mirror(args.source, args.out, args.checkpoint, args.pp, args.tp, name,
                            kv_policy=args.kv_policy, overwrite=args.overwrite))
    return 0


def cmd_gsm8k_task(args) -> int:
    from servematrix.check import gsm8k
    from servematrix.report import check_dir

    shipped = len(gsm8k.exemplars())
    if args.num_fewshot > shipped:  # lm-eval would fail only once the server is up
        raise ArgumentError("--num-fewshot", f"at most {shipped} (the exemplars servematrix ships), got {args.num_fewshot}")
    check_dir(Path(args.dir) / "task")  # DIR (or DIR/task) a file, or not writable: refused up front
    print(gsm8k.write_task(Path(args.dir), args.num_fewshot))
    return 0


def cmd_gate(args) -> int:
    from servematrix.report import gate

    run = gate.load_summary(Path(args.run_dir))
    baseline = gate.load_summary(Path(args.baseline)) if args.baseline else None
    decision = gate.decide(run, baseline, args.min_load_rate, args.min_accuracy_rate)
    print(gate.render(decision, run))
    return decision.exit_code


def cmd_reference_record(args) -> int:
    from servematrix.check import accuracy
    from servematrix.report import gate
    from servematrix.report import atomic_write, writable_target

    run = gate.load_summary(Path(args.run_dir))
    out = Path(args.out)
    writable_target(out)  # a directory, FIFO or device there is refused before it is read
    existing = _existing_references(out)
    new = []
    for r in run.scenarios:
        if r.verdict != "pass":
            continue  # only a scenario that met its expectation is trusted as a reference
        vllm = f"=={run.vllm_version.split('+')[0]}" if run.vllm_version and not args.any_vllm else ""
        key = accuracy.RefKey(scenario=r.scenario, quant=r.quant, tp=r.tp, pp=r.pp, device=r.device, vllm=vllm)
        for metric, value in r.metrics.items():
            rel = os.path.relpath(run.run_dir)
            source = run.run_dir if rel.startswith("..") else rel
            new.append(accuracy.reference_from(metric, value, key, source))
    if not new:  # the references file is left exactly as it was
        print(f"{args.run_dir}: no passing scenario with metrics; nothing recorded", file=sys.stderr)
        return 1
    replaced = {(n.key, n.metric) for n in new}
    kept = [e for e in existing if (e.key, e.metric) not in replaced]
    atomic_write(out, accuracy.dump_references(kept + new))
    for n in new:
        print(f"{out}: {n.key.scenario}/tp{n.key.tp}-pp{n.key.pp}-{n.key.quant} {n.metric} = {n.mean:.4f} "
              f"(sigma {n.sigma:.4f}, n {n.n})")
    return 0


def _existing_references(path: Path) -> list:
    """The references already in `path` (kept beside the new ones). A file that does not parse is
    someone's data: refused, never overwritten with what this run alone would record."""
    from servematrix.check import accuracy
    from servematrix.config.yamlio import load_yaml, validate

    if not path.exists():
        return []
    try:
        located = load_yaml(path)
        return [] if located.data is None else validate(located, accuracy.ReferenceFile).references
    except ConfigError as exc:
        where = f"line {exc.line}: " if exc.line else ""
        field = f"{exc.field}: " if exc.field else ""
        raise StateError(path, f"existing references do not parse ({where}{field}{exc.message}); "
                               "not overwritten: fix or move the file, then record again") from exc


def cmd_history(args) -> int:
    from servematrix.report import history

    print(history.render_trend(history.trend(Path(args.db), args.last, args.k)))
    return 0


def cmd_diff(args) -> int:
    from servematrix.report import gate
    from servematrix.report import history

    changes = history.diff(gate.load_summary(Path(args.run_a)), gate.load_summary(Path(args.run_b)))
    for title, items in changes.items():
        print(f"{title}: {len(items)}")
        for i in items:
            print(f"  - {i}")
    return 0


def cmd_env(args) -> int:
    from servematrix.serve import envs

    if args.env_cmd == "list":
        for name, info in envs.list_envs():
            state = f"vllm {info['vllm']}, torch {info['torch']}" if info else "not built"
            print(f"{name:<14} {state:<40} {envs.root(name)}")
        return 0
    # every name is checked before the first environment is built or removed
    if args.env_cmd == "ensure":
        for name in args.names:
            if name != envs.CURRENT:
                envs.declared(name)
        for name in args.names:
            print(f"{name}: {envs.ensure(name)}")
        return 0
    for name in args.names:
        envs.removable(name)
    for name in args.names:
        print(f"{name}: {'removed' if envs.remove(name) else 'not built'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="servematrix", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check matrix files (and the scenarios they name) without running")
    v.add_argument("matrix", nargs="+")
    v.set_defaults(func=cmd_validate)

    ls = sub.add_parser("list", help="print the expanded scenario ids")
    ls.add_argument("matrix", nargs="+")
    ls.add_argument("-k", help="filter: substring or glob of the id, tag:NAME; comma = or")
    ls.add_argument("-v", "--verbose", action="store_true")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("run", help="run a matrix against real vLLM servers")
    r.add_argument("matrix", nargs="?", default=str(DEFAULT_MATRIX))
    r.add_argument("--out", type=out_dir, help="run directory (default reports/<timestamp>); refused if it holds a run")
    r.add_argument("--overwrite", action="store_true", help="--out may already hold a run: write over its reports")
    r.add_argument("-k", help="filter: substring or glob of the id, tag:NAME; comma = or")
    r.add_argument("--limit", type=positive_int, help="gsm8k questions per scenario (overrides the matrix)")
    r.add_argument("--no-gsm8k", action="store_true")
    r.add_argument("--backend", default="local", choices=["local", "docker", "ray"],
                   help="local processes, containers through the Docker API, or Ray tasks over a cluster")
    r.add_argument("--gpus", type=gpu_ids, help="GPU ids this host may hand out, e.g. 0,1,2,3 (default: every visible GPU)")
    r.add_argument("--ray-address", help="--backend ray: the cluster to join (default: start one here)")
    r.add_argument("--docker-image", help="--backend docker: image with vLLM and servematrix "
                   "(default servematrix/vllm-cpu:0.32.0, built by docker-compose.yml); engine: DOCKER_HOST")
    r.add_argument("--docker-python", default="python3", help="--backend docker: the image's interpreter")
    r.add_argument("--docker-mount", action="append", default=[], metavar="HOST:CONTAINER[:ro]")
    r.add_argument("--docker-network", default="host", choices=["host", "bridge"])
    r.add_argument("--python", type=interpreter, help="interpreter with vLLM and lm-eval (default: this one)")
    r.add_argument("--startup-timeout", type=finite_positive_float, help="seconds (default: the matrix's)")
    r.add_argument("--retries", type=non_negative_int, default=1, help="extra attempts after an infrastructure failure")
    r.add_argument("--inject", action="append", metavar="FIX",
                   help="enable a fix module (e.g. the inject-scale fault) in every scenario; ids unchanged")
    r.set_defaults(func=cmd_run)

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

    b = sub.add_parser("bisect", help="find the adjacent vLLM releases where a scenario's outcome changes")
    b.add_argument("id")
    b.add_argument("--between", nargs=2, required=True, metavar=("LOW", "HIGH"),
                   help="releases (e.g. 0.18.1 0.32.0) as declared in servematrix/data/vllm-releases.yaml")
    b.add_argument("--matrix", help="matrix file (default: search matrix/*.yaml)")
    b.add_argument("--signature", help="regex a failure must match to count as bad (default: the entry's xfail signature)")
    b.add_argument("--out", type=out_dir, help="bisect directory (default reports/bisect-<timestamp>); refused if it holds one")
    b.add_argument("--overwrite", action="store_true", help="--out may already hold a bisect: write over it")
    b.add_argument("--python", type=interpreter)
    b.add_argument("--log-lines", type=non_negative_int, default=15)
    b.set_defaults(func=cmd_bisect)

    g = sub.add_parser("gate", help="release decision from a run: 0 ship, 1 regression, 2 cannot judge")
    g.add_argument("run_dir")
    g.add_argument("--baseline", help="an earlier run to compare with")
    g.add_argument("--min-load-rate", type=unit_interval, default=1.0)
    g.add_argument("--min-accuracy-rate", type=unit_interval, default=1.0)
    g.set_defaults(func=cmd_gate)

    ref = sub.add_parser("reference", help="accuracy references")
    ref_sub = ref.add_subparsers(dest="ref_cmd", required=True)
    rec = ref_sub.add_parser("record", help="write references from a trusted run's passing scenarios")
    rec.add_argument("run_dir")
    rec.add_argument("--out", default="references/gsm8k.yaml")
    rec.add_argument("--any-vllm", action="store_true", help="do not pin the reference to this vLLM version")
    rec.set_defaults(func=cmd_reference_record)

    h = sub.add_parser("history", help="last verdicts and accuracies per scenario")
    h.add_argument("--db", default="reports/history.sqlite")
    h.add_argument("--last", type=positive_int, default=10)
    h.add_argument("-k", help="substring of the scenario id")
    h.set_defaults(func=cmd_history)

    d = sub.add_parser("diff", help="newly failing / passing scenarios and accuracy moves beyond the MDE")
    d.add_argument("run_a")
    d.add_argument("run_b")
    d.set_defaults(func=cmd_diff)

    env = sub.add_parser("env", help="per-release vLLM environments (the matrix's vllm axis)")
    env_sub = env.add_subparsers(dest="env_cmd", required=True)
    env_sub.add_parser("list", help="known releases and their environments").set_defaults(func=cmd_env)
    for verb in ("ensure", "remove"):
        e = env_sub.add_parser(verb, help=f"{verb} the environment of each named release")
        e.add_argument("names", nargs="+")
        e.set_defaults(func=cmd_env)

    mi = sub.add_parser("mirror", help="a tiny forged twin of a checkpoint from its metadata (names, dtypes, quant layout)")
    mi.add_argument("source", help="a checkpoint directory, hf:ORG/NAME[@REV] (metadata only), or model_type:TYPE")
    mi.add_argument("--out", help="scenario file to write (scenarios/NAME.yaml)")
    mi.add_argument("--name", help="scenario name (default: the --out file's stem)")
    mi.add_argument("--checkpoint", help="also write the twin checkpoint into this directory and diff it")
    mi.add_argument("--pp", type=positive_int, default=2, help="largest PP the twin must split into (layers >= it)")
    mi.add_argument("--tp", type=_checked(lambda t: [int(x) for x in t.split(",")], lambda v: all(1 <= x <= 1024 for x in v),
                                          "TP sizes from 1 to 1024, comma-separated (e.g. 1,2,4)"), default=[1, 2],
                    help="TP sizes the twin must serve: KV heads are chosen so they both split and replicate")
    mi.add_argument("--kv-policy", choices=["cover", "faithful"], default="cover")
    mi.add_argument("--diff", metavar="TWIN", help="compare SOURCE with TWIN instead: exit 1 when names/dtypes differ")
    mi.add_argument("--overwrite", action="store_true", help="--out may replace an existing scenario file")
    mi.set_defaults(func=cmd_mirror)

    t = sub.add_parser("gsm8k-task", help="write servematrix's offline gsm8k task YAML into DIR/task")
    t.add_argument("dir")
    t.add_argument("--num-fewshot", type=non_negative_int, default=5)
    t.set_defaults(func=cmd_gsm8k_task)
    return p


def main(argv: list[str] | None = None) -> int:
    """The one place a user's mistake becomes exit 2 and one line (a traceback only with --debug).
    An unexpected exception is a servematrix bug, never a regression: also exit 2, one line."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:  # a refused argument (_Parser.error)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return 0 if exc.code in (0, None) else 2
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback, exit 2
        if args.debug:
            raise
        print(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); "
              "run again with --debug for the traceback", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    from servematrix.redact import redact_text

    return redact_text(" ".join(str(exc).split()))[:2000]


if __name__ == "__main__":
    sys.exit(main())
