"""The commands that judge and compare finished runs: gate (the release decision), reference
record (accuracy references from a trusted run), history, diff, waivers (every xfail's state);
and gsm8k-task (the offline task
file lm-eval reads, for running the check by hand).

Each `add_*` declares one subcommand's arguments beside the `cmd_*` that carries it out; imports of
the product stay inside the functions, so that `servematrix --help` starts fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from servematrix.cli.args import non_negative_int, positive_int, unit_interval
from servematrix.errors import ArgumentError, ConfigError, StateError

DEFAULT_DB = "reports/history.sqlite"  # where runs append, beside their run directories


def add_gate(sub) -> None:
    g = sub.add_parser("gate", help="release decision from a run: 0 ship, 1 regression, 2 cannot judge")
    g.add_argument("run_dir")
    g.add_argument("--baseline", help="an earlier run to compare with")
    g.add_argument("--min-load-rate", type=unit_interval, default=1.0)
    g.add_argument("--min-accuracy-rate", type=unit_interval, default=1.0)
    g.add_argument("--history", type=positive_int, metavar="N",
                   help="read verdicts through the last N runs of the history (hysteresis, flake rates)")
    g.add_argument("--db", help="the history database (default: history.sqlite beside RUN_DIR)")
    g.add_argument("--fail-on-stale-waivers", action="store_true",
                   help="exit 1 when a waiver (xfail) is stale or expired")
    g.set_defaults(func=cmd_gate)


def cmd_gate(args) -> int:
    import datetime

    from servematrix.report import gate, history, waivers

    run = gate.load_summary(Path(args.run_dir))
    baseline = gate.load_summary(Path(args.baseline)) if args.baseline else None
    db = _named_db("--db", args.db) if args.db else history.db_path(Path(args.run_dir))
    last = args.history or waivers.DEFAULT_LAST
    # the history is read only when asked for (a plain gate judges the run alone, as it always has)
    asked = args.history or args.db or args.fail_on_stale_waivers
    results = history.trend(db, last) if asked else {}
    evidence = waivers.Evidence(today=datetime.datetime.now(datetime.timezone.utc).date(), last=last,
                                fix_reports=waivers.fix_reports_of(run, results), results=results)
    states = waivers.judge_all(waivers.from_run(run), evidence)
    standings = gate.standings(run, results, args.history) if args.history else None
    decision = gate.decide(run, baseline, args.min_load_rate, args.min_accuracy_rate, history=standings,
                           waivers=states, fail_on_stale_waivers=args.fail_on_stale_waivers)
    print(gate.render(decision, run))
    return decision.exit_code


def add_waivers(sub) -> None:
    w = sub.add_parser("waivers", help="every waiver (xfail) with its state: active, stale (why) or expired")
    w.add_argument("matrix", nargs="*", help="matrix files (default: matrix/*.yaml)")
    w.add_argument("--history", metavar="DB",
                   help="history database: xpasses and fix reports of recent runs (default: reports/history.sqlite)")
    w.add_argument("--last", type=positive_int, default=None, metavar="N",
                   help="runs of the history to look in (default 5)")
    w.set_defaults(func=cmd_waivers)


def cmd_waivers(args) -> int:
    import datetime

    from servematrix.config.matrix import validate_files
    from servematrix.report import history, waivers
    from servematrix.serve import envs

    paths = [Path(p) for p in args.matrix] or sorted(Path("matrix").glob("*.yaml"))
    if not paths:
        raise ArgumentError("MATRIX", "no matrix file given and none in matrix/*.yaml")
    found = [w for m in validate_files(paths) for w in waivers.from_entries(m.entries)]
    if any(w.release == envs.CURRENT for w in found):  # the version "current" runs, for release-valued untils
        current = envs.versions(envs.CURRENT, sys.executable)["vllm"]
        found = [w.model_copy(update={"version": current}) if w.release == envs.CURRENT else w for w in found]
    db = _named_db("--history", args.history) if args.history else Path(DEFAULT_DB)
    last = args.last or waivers.DEFAULT_LAST
    results = history.trend(db, last)
    evidence = waivers.Evidence(today=datetime.datetime.now(datetime.timezone.utc).date(), last=last,
                                fix_reports=waivers.fix_reports_of(None, results), results=results)
    note = "" if results else f"(no history in {db}: xpasses and fix reports not consulted)"
    print(waivers.render(waivers.judge_all(found, evidence), note))
    return 0


def add_reference(sub) -> None:
    ref = sub.add_parser("reference", help="accuracy references")
    ref_sub = ref.add_subparsers(dest="ref_cmd", required=True)
    rec = ref_sub.add_parser("record", help="write references from a trusted run's passing scenarios")
    rec.add_argument("run_dir")
    rec.add_argument("--out", default="references/gsm8k.yaml")
    rec.add_argument("--any-vllm", action="store_true", help="do not pin the reference to this vLLM version")
    rec.set_defaults(func=cmd_reference_record)


def cmd_reference_record(args) -> int:
    from servematrix.config import references
    from servematrix.report import gate
    from servematrix.files import atomic_write, writable_target
    from servematrix.redact import terminal

    run = gate.load_summary(Path(args.run_dir))
    out = Path(args.out)
    writable_target(out)  # a directory, FIFO or device there is refused before it is read
    existing, header = _existing_references(out)
    new = _new_references(run, args.any_vllm, Path(args.run_dir) / "summary.json")
    if not new:  # the references file is left exactly as it was
        print(f"{terminal(args.run_dir, None)}: no passing scenario with metrics; nothing recorded", file=sys.stderr)
        return 1
    replaced = {(n.key, n.metric) for n in new}
    kept = [e for e in existing if (e.key, e.metric) not in replaced]
    atomic_write(out, references.dump_references(kept + new, header))
    for n in new:  # ids and metric names come from the summary: printed through redact.terminal
        print(f"{terminal(out, None)}: {terminal(f'{n.key.scenario}/tp{n.key.tp}-pp{n.key.pp}-{n.key.quant}')} "
              f"{terminal(n.metric)} = {n.mean:.4f} (sigma {n.sigma:.4f}, n {n.n})")
    return 0


def _new_references(run, any_vllm: bool, where: Path) -> list:
    """One reference per metric of each scenario of `run` that met its expectation, pinned to the
    run's vLLM release unless `any_vllm`. A metric the Reference model refuses (a NaN or infinite
    mean or sigma: not measured) is a StateError naming the summary, scenario and metric: nothing
    is written rather than a reference that no check could be judged against."""
    from pydantic import ValidationError

    from servematrix.check import accuracy
    from servematrix.config import references

    new = []
    for r in run.scenarios:
        if r.verdict != "pass":
            continue  # only a scenario that met its expectation is trusted as a reference
        vllm = f"=={run.vllm_version.split('+')[0]}" if run.vllm_version and not any_vllm else ""
        key = references.RefKey(scenario=r.scenario, quant=r.quant, tp=r.tp, pp=r.pp, device=r.device, vllm=vllm)
        for metric, value in r.metrics.items():
            rel = os.path.relpath(run.run_dir)
            source = run.run_dir if rel.startswith("..") else rel
            try:
                new.append(accuracy.reference_from(metric, value, key, source, r))
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                raise StateError(where, f"{r.id}: {metric}: {field} {err.get('input')!r} cannot be a reference "
                                        f"({err['msg']}); nothing written") from None
    return new


def _existing_references(path: Path) -> tuple[list, str | None]:
    """The references already in `path` (kept beside the new ones) and the comments it begins with
    (kept as its header: a file of comments only parses as empty, but it is someone's notes). A
    file that does not parse is someone's data: refused, never overwritten with what this run
    alone would record."""
    from servematrix.config import references
    from servematrix.config.yamlio import load_yaml, validate

    if not path.exists():
        return [], None
    try:
        located = load_yaml(path)
        refs = [] if located.data is None else validate(located, references.ReferenceFile).references
        return refs, references.leading_comments(located.text) or None
    except ConfigError as exc:
        where = f"line {exc.line}: " if exc.line else ""
        field = f"{exc.field}: " if exc.field else ""
        raise StateError(path, f"existing references do not parse ({where}{field}{exc.message}); "
                               "not overwritten: fix or move the file, then record again") from exc


def add_history(sub) -> None:
    h = sub.add_parser("history", help="last verdicts and accuracies per scenario")
    h.add_argument("--db", help=f"the history database (default: {DEFAULT_DB}; named here, it must exist)")
    h.add_argument("--last", type=positive_int, default=10)
    h.add_argument("-k", help="substring of the scenario id")
    h.set_defaults(func=cmd_history)


def cmd_history(args) -> int:
    from servematrix.report import history

    db = _named_db("--db", args.db) if args.db else Path(DEFAULT_DB)
    print(history.render_trend(history.trend(db, args.last, args.k)))
    return 0


def _named_db(flag: str, value: str) -> Path:
    """A history database the user named: it must be there. Only the default place may be absent
    ("no history yet"): a typo must not read as an empty history, in every command that reads one."""
    db = Path(value)
    try:
        db.lstat()
    except FileNotFoundError:
        raise ArgumentError(flag, f"{db}: no such history database") from None
    except OSError as exc:  # a directory on the way this user may not search
        raise StateError(db, f"cannot be read: {exc.strerror or exc}") from None
    return db


def add_diff(sub) -> None:
    d = sub.add_parser("diff", help="newly failing / passing scenarios and accuracy moves beyond the MDE")
    d.add_argument("run_a")
    d.add_argument("run_b")
    d.set_defaults(func=cmd_diff)


def cmd_diff(args) -> int:
    from servematrix.redact import terminal
    from servematrix.report import gate
    from servematrix.report.comparison import compare_runs

    # diff reports what it cannot compare ("not comparable" section) instead of refusing: only the
    # gate must refuse, because it decides
    changes = compare_runs(gate.load_summary(Path(args.run_a)), gate.load_summary(Path(args.run_b)), refuse=False)
    for title, items in changes.sections().items():
        print(f"{title}: {len(items)}")
        for i in items:  # ids and signatures from the summaries: shown, never obeyed (redact.terminal)
            print(f"  - {terminal(i, gate.LINE)}")
    return 0


def add_gsm8k_task(sub) -> None:
    t = sub.add_parser("gsm8k-task", help="write servematrix's offline gsm8k task YAML into DIR/task")
    t.add_argument("dir")
    t.add_argument("--num-fewshot", type=non_negative_int, default=5)
    t.set_defaults(func=cmd_gsm8k_task)


def cmd_gsm8k_task(args) -> int:
    from servematrix.check import gsm8k
    from servematrix.files import check_dir

    shipped = len(gsm8k.exemplars())
    if args.num_fewshot > shipped:  # lm-eval would fail only once the server is up
        raise ArgumentError("--num-fewshot", f"at most {shipped} (the exemplars servematrix ships), got {args.num_fewshot}")
    check_dir(Path(args.dir) / "task")  # DIR (or DIR/task) a file, or not writable: refused up front
    print(gsm8k.write_task(Path(args.dir), args.num_fewshot))
    return 0
