"""Typed argument converters for the command line. Each says what it accepts; argparse turns a
refusal into one line and exit 2 (through `_Parser.error` and `servematrix.cli.main`)."""

from __future__ import annotations

import argparse
import math
import shutil

from servematrix.errors import ArgumentError


def _checked(parse, ok, accepted: str):
    """A converter: `parse(text)`, then `ok(value)`; a ValueError or a refused value is one
    argparse error naming what would have been `accepted`."""

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
tp_sizes = _checked(lambda t: [int(x) for x in t.split(",")], lambda v: all(1 <= x <= 1024 for x in v),
                    "TP sizes from 1 to 1024, comma-separated (e.g. 1,2,4)")


class _Parser(argparse.ArgumentParser):
    """argparse whose refusals are ArgumentErrors like every other: one line and exit 2 in main
    (instead of argparse's usage block)."""

    def error(self, message: str):
        raise ArgumentError(self.prog, f"{message} (see {self.prog} --help)")
