"""Field types every configuration model shares (matrix, scenario, forge spec, GGUF source): the
bounds on a timeout, a line of text, an argument, a path, a regex and an environment name.

Separate from yamlio.py, which loads, locates and validates YAML: these are what a model declares,
not how a file is read, and a model that needs only them does not need the loader.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator, Field, HttpUrl, StringConstraints, TypeAdapter

from servematrix.redact import ENV_NAME

__all__ = ["Seconds", "OneLine", "PathText", "Word", "Regex", "EnvName", "BugLink", "shape_templates"]

MAX_SECONDS = 86_400.0  # a timeout beyond a day is a hang, not a wait
MAX_LINE = 1_000  # characters of a one-line text (a reason, a title, a glob)
MAX_WORD = 65_536  # characters of one argument or environment value (Linux allows 128 KiB)
MAX_REGEX = 1_000
MAX_PATH_PART = 255  # bytes of one path component (NAME_MAX)

# Any timeout: finite, at least a second (lm-eval is handed whole seconds: 0.5 would be 0, no
# wait at all), at most a day; `true` is not a number of seconds.
Seconds = Annotated[float, Field(strict=True, ge=1, le=MAX_SECONDS, allow_inf_nan=False)]

_LINE_BREAKING = {"Cc", "Zl", "Zp"}  # control characters (\n, \r, NUL, ESC ...), line/paragraph separators


def _one_line(v: str) -> str:
    bad = next((c for c in v if unicodedata.category(c) in _LINE_BREAKING), None)
    if bad is not None:
        raise ValueError(f"must be one line of text without control characters (found U+{ord(bad):04X})")
    return v


def _word(v: str) -> str:
    # NUL: no process can be given one; a line break would split every printed command
    if "\0" in v or "\n" in v or "\r" in v:
        raise ValueError("must not contain NUL or a line break")
    return v


def _path(v: str) -> str:
    # every lookup of a longer component fails with ENAMETOOLONG, which pathlib does not swallow
    long = next((part for part in v.split("/") if len(part.encode()) > MAX_PATH_PART), None)
    if long is not None:
        raise ValueError(f"path component {long[:20]!r}... is longer than {MAX_PATH_PART} bytes")
    return v


def _compiles(v: str) -> str:
    try:
        re.compile(v)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:  # re.error is no ValueError
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return v


# A reason, a title, a glob or a path: one printable line.
OneLine = Annotated[str, StringConstraints(max_length=MAX_LINE), AfterValidator(_one_line)]
# A file or directory path: one line, no component longer than a file name can be.
PathText = Annotated[OneLine, StringConstraints(min_length=1), AfterValidator(_path)]
# A command-line argument or an environment value.
Word = Annotated[str, StringConstraints(max_length=MAX_WORD), AfterValidator(_word)]
# A regular expression (compiled once here, so a run never meets a bad one).
Regex = Annotated[str, StringConstraints(max_length=MAX_REGEX), AfterValidator(_compiles)]
# An environment variable name: what a shell and `env` accept.
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME, max_length=256)]


# A waiver's bug: an upstream issue or PR (an http(s) URL), or, where upstream has none, servematrix's
# own write-up of it with a repro, as `docs/<page>.md#<heading anchor>` in this repository (the
# heading must exist, so a renamed section fails the matrix, not a reader following the link).
_WRITE_UP = re.compile(r"docs/[\w.-]+\.md#[\w-]+")


def _bug_link(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        return _write_up(v)
    try:
        return str(TypeAdapter(HttpUrl).validate_python(v))
    except ValueError:
        raise ValueError(f"{v!r} is not a URL") from None


def _write_up(v: str) -> str:
    from pathlib import Path

    if not _WRITE_UP.fullmatch(v):
        raise ValueError(f"{v!r} is neither an http(s) URL of the upstream bug nor a write-up docs/<page>.md#<anchor>")
    page, _, anchor = v.partition("#")
    repo = Path(__file__).resolve().parents[2]  # the repository holding this package
    if not (repo / "docs").is_dir():  # an installed copy (a wheel, the runner image): no docs to hold it to
        return v
    try:
        headings = [line.lstrip("#").strip() for line in (repo / page).read_text().splitlines() if line.startswith("#")]
    except OSError:
        raise ValueError(f"no write-up {page} in this repository") from None
    if anchor not in {heading_anchor(h) for h in headings}:
        raise ValueError(f"{page} has no heading whose anchor is #{anchor}")
    return v


def heading_anchor(heading: str) -> str:
    """The anchor a Markdown heading gets on GitHub: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


BugLink = Annotated[OneLine, AfterValidator(_bug_link)]


def shape_templates(dim: re.Pattern, words: str):
    """{tensor name: shape} in packaged data, each dimension an int or a template `dim` matches
    (spaces ignored; `words` says what a template is in the refusal): the connector tensors of a
    composite twin (mirror/composite.py) and a speculative draft's own tensors (sweep/drafts.py)."""

    def check(tensors: dict[str, list[int | str]]) -> dict[str, list[int | str]]:
        for name, shape in tensors.items():
            bad = [d for d in shape if isinstance(d, str) and not dim.match(d.replace(" ", ""))]
            if bad or not shape:
                raise ValueError(f"{name}: each dimension is an int or {words}, not {bad or shape}")
        return tensors

    return Annotated[dict[str, list[int | str]], AfterValidator(check)]
