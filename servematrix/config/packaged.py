"""Packaged data (servematrix/data/*.yaml) read the one way a user's YAML is read.

A data file shipped in the wheel is still a file someone edits by hand (a new device profile, a
new quantization scheme, a release's quirks), so it gets what a matrix or scenario gets: the
bounded loader of yamlio.py (YAML 1.1 numbers and duplicate keys refused, aliases bounded) and a
pydantic model, and a damaged one stops with `path:line: field: why` (a ConfigError), not with a
KeyError three modules later.

`load` returns the model. `load_raw` validates the same way and returns the data as the file has
it, for data handed on untouched (lm-eval's task file, whose keys are lm-eval's) or read by key by
code written before its model; a deep copy each call, since callers fill such data in.

Parsed files are cached per (path, mtime, model): a file edited in place is read again.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from servematrix.config.yamlio import load_yaml, validate
from servematrix.paths import data_file

M = TypeVar("M", bound=BaseModel)


def path_of(name: str | Path) -> Path:
    """servematrix/data/<name>; a Path is taken as it is (a caller that already holds one)."""
    return name if isinstance(name, Path) else data_file(name)


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int, model: type[BaseModel] | None) -> tuple[Any, BaseModel | None]:
    located = load_yaml(path)
    return located.data, (validate(located, model) if model is not None else None)


def _cached(name: str | Path, model: type[BaseModel] | None) -> tuple[Any, BaseModel | None]:
    path = path_of(name)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0  # load_yaml says why it cannot be read, at the file
    return _read(str(path), mtime, model)


def load(name: str | Path, model: type[M]) -> M:
    """The packaged file `name` as `model` (shared between callers: do not mutate it)."""
    return _cached(name, model)[1]  # type: ignore[return-value]


def load_raw(name: str | Path, model: type[BaseModel] | None) -> Any:
    """The packaged file `name` as parsed, once it validates as `model` (None: only the YAML
    itself is checked, for a file whose model lives with code being rewritten)."""
    return copy.deepcopy(_cached(name, model)[0])
