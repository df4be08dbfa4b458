"""The commands that prepare what a run needs: env (the per-release vLLM environments of the
matrix's vllm axis) and mirror (a tiny forged twin of a real checkpoint, as a scenario file).

Each `add_*` declares one subcommand's arguments beside the `cmd_*` that carries it out; imports of
the product stay inside the functions, so that `servematrix --help` starts fast."""

from __future__ import annotations

from pathlib import Path

from servematrix.cli.args import positive_int, tp_sizes
from servematrix.errors import ArgumentError
from servematrix.mirror.dims import KV_POLICIES


def add_env(sub) -> None:
    env = sub.add_parser("env", help="per-release vLLM environments (the matrix's vllm axis)")
    env_sub = env.add_subparsers(dest="env_cmd", required=True)
    env_sub.add_parser("list", help="every release known (declared or resolved) and every environment built"
                       ).set_defaults(func=cmd_env)
    for verb, what in (("ensure", "a declared release's name or any published version X.Y.Z"),
                       ("remove", "a known release's name")):
        e = env_sub.add_parser(verb, help=f"{verb} the environment of each named release")
        e.add_argument("names", nargs="+", help=what)
        e.set_defaults(func=cmd_env)


def cmd_env(args) -> int:
    from servematrix.serve import envs

    if args.env_cmd == "list":
        from servematrix.redact import terminal

        # a name is a directory's under the cache, and the state quotes its marker file: both are
        # read from disk, so both are printed through redact.terminal (escaped, masked, bounded)
        for name, rel, info in envs.catalog():
            if rel is None:
                state = "built, no longer declared or resolved (env remove refuses it: remove the directory by hand)"
            else:
                st = envs.state(rel, info)
                state = {"missing": "not built", "stale": "built from another recipe: rebuilt by env ensure",
                         "damaged": f"{info and info.get('damaged')}: rebuilt by env ensure",
                         "built": f"vllm {info and info.get('vllm')}, torch {info and info.get('torch')}"}[st]
            print(f"{terminal(name):<14} {terminal(state):<40} {terminal(envs.root(name), None)}")
            if rel is not None:
                deps = " --no-deps" if rel.no_deps else ""
                print(terminal(f"{'':<14} recipe {rel.recipe_hash()}: {rel.vllm}{deps}, {rel.torch}"
                               + (f", without {', '.join(rel.skip)}" if rel.skip else "") + f" ({rel.origin})", None))
                for key, value in sorted(rel.env.items()):
                    print(terminal(f"{'':<14} env {key}={value!r}", None))  # a secret-named one masked
                if rel.not_served:
                    print(terminal(f"{'':<14} load-checked only here: {rel.not_served}", None))
                for note in rel.notes:
                    print(terminal(f"{'':<14} note: {note}", None))
        return 0
    # every name is checked (and a bare version resolved) before the first environment is built or removed
    if args.env_cmd == "ensure":
        names = [envs.canonical(name) for name in args.names]
        for name in names:
            print(f"{name}: {envs.ensure(name)}")
        return 0
    for name in args.names:
        envs.removable(name)
    for name in args.names:
        print(f"{name}: {'removed' if envs.remove(name) else 'not built'}")
    return 0


def add_mirror(sub) -> None:
    mi = sub.add_parser("mirror", help="a tiny forged twin of a checkpoint from its metadata (names, dtypes, quant layout)")
    mi.add_argument("source", help="a checkpoint directory, hf:ORG/NAME[@REV] (metadata only), or model_type:TYPE")
    mi.add_argument("--out", help="scenario file to write (scenarios/NAME.yaml)")
    mi.add_argument("--name", help="scenario name (default: the --out file's stem)")
    mi.add_argument("--checkpoint", help="also write the twin checkpoint into this directory and diff it")
    mi.add_argument("--pp", type=positive_int, default=2, help="largest PP the twin must split into (layers >= it)")
    mi.add_argument("--tp", type=tp_sizes, default=[1, 2],
                    help="TP sizes the twin must serve: KV heads are chosen so they both split and replicate")
    mi.add_argument("--kv-policy", choices=KV_POLICIES, default="cover",
                    help="the twin's KV heads: cover (one --tp splits them, another replicates them), faithful (each "
                         "--tp splits or replicates them as the source's do), replicate (fewer than every --tp > 1)")
    mi.add_argument("--diff", metavar="TWIN", help="compare SOURCE with TWIN instead: exit 1 when names/dtypes differ")
    mi.add_argument("--overwrite", action="store_true", help="--out may replace an existing scenario file")
    mi.set_defaults(func=cmd_mirror)


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
