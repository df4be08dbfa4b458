"""The `servematrix` command line. Exit codes: 0 every scenario met its expectation, 1 a
scenario did not (regression), 2 configuration or infrastructure error (nothing judged)."""

# The docstring above is also `servematrix --help`'s description. The package: args.py holds the
# typed argument converters; run_commands.py, setup_commands.py and report_commands.py each pair a
# subcommand's arguments (add_*) with the function that carries it out (cmd_*). Those modules
# import the product only inside their functions, so that `--help` starts fast.

from __future__ import annotations

import argparse
import sys

from servematrix.cli import report_commands, run_commands, setup_commands, sweep_commands
from servematrix.cli.args import _Parser
from servematrix.errors import UserError

# the order the subcommands are listed in by --help (and in argparse's "invalid choice" line)
_COMMANDS = (
    run_commands.add_validate, run_commands.add_list, run_commands.add_run, run_commands.add_repro,
    run_commands.add_bisect, report_commands.add_gate, report_commands.add_reference,
    report_commands.add_history, report_commands.add_diff, setup_commands.add_env, setup_commands.add_mirror,
    report_commands.add_gsm8k_task,
    sweep_commands.add_sweep,
    report_commands.add_waivers,
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="servematrix", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in _COMMANDS:
        add(sub)
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
            _traceback()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback, exit 2
        if args.debug:
            _traceback()
        print(f"error: internal error ({type(exc).__name__}: {_one_line(exc)})"
              + ("" if args.debug else "; run again with --debug for the traceback"), file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    from servematrix.redact import terminal

    return terminal(" ".join(str(exc).split()), width=2000)


def _traceback() -> None:
    """--debug: the traceback, redacted like every other line servematrix prints (its frames show
    argument values and file contents), then the usual one line and exit code: --debug changes
    what is shown, never the verdict (1 means regression; a user error stays 2)."""
    import traceback

    from servematrix.redact import redact_text

    print(redact_text(traceback.format_exc()).rstrip("\n"), file=sys.stderr)
