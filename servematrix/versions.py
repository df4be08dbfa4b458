"""Release and version order, decided once: the key a release name (`cpu-0.32.0`) or a version
(`0.32.0`, `0.32.0+cpu`) sorts by, and what a waiver's `until:` may say (a date, or a release of
a family). A base module: it imports no stage, so the gate, waivers, bisect and the matrix schema
share it without importing each other.

Every input here may come from a file a user or another tool wrote (a matrix, a summary.json), so
every one is bounded: a 5,000-digit "version" is refused with a VersionError (a ValueError, which
pydantic turns into a located field error) instead of reaching int(), whose own limit would
escape as an internal error."""

from __future__ import annotations

import datetime
import re

MAX_CHARS = 64  # characters of a release name or version: real ones have about 20
MAX_DIGITS = 9  # digits of one number in a version (vLLM's are 1-3)

# a release of a family: `cpu-0.33.0`, `cuda-0.34.0` (the family's versions, 2 to 4 numbers)
RELEASE = re.compile(rf"([a-z][a-z0-9]*)-(\d{{1,{MAX_DIGITS}}}(?:\.\d{{1,{MAX_DIGITS}}}){{1,3}})")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class VersionError(ValueError):
    """Text that cannot be ordered as a version; `str()` says why and what is accepted."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 24 else text[:20] + "…")


def version_key(name: str) -> tuple[int, ...]:
    """The numbers of a release name's version part (after the family's `-`), or of a version:
    cpu-0.32.0 and 0.32.0 both give (0, 32, 0). Text too long, or a number too long, to be a
    version is a VersionError."""
    if not isinstance(name, str):
        raise VersionError(f"expected a version as text, got {type(name).__name__}")
    if len(name) > MAX_CHARS:
        raise VersionError(f"{_shown(name)} is {len(name)} characters, not a version (at most {MAX_CHARS})")
    numbers = re.findall(r"\d+", name.split("-", 1)[-1])
    long = next((n for n in numbers if len(n) > MAX_DIGITS), None)
    if long is not None:
        raise VersionError(f"{_shown(name)} holds a {len(long)}-digit number, not a version "
                           f"(at most {MAX_DIGITS} digits per number)")
    return tuple(int(n) for n in numbers)


def parse_until(text: str) -> datetime.date | tuple[str, tuple[int, ...]]:
    """A waiver's `until:` as what it ends on: a date (YYYY-MM-DD), or a release as (family,
    version key). Anything else is a VersionError: an end that cannot be read is refused, never
    taken as passed (which would fail a gate on a typo) or as never passing."""
    if not isinstance(text, str):
        raise VersionError(f"expected a date (YYYY-MM-DD) or a release such as cpu-0.33.0, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise VersionError(f"{_shown(text)} is {len(text)} characters: not a date or a release "
                           f"(at most {MAX_CHARS})")
    if _DATE.fullmatch(text):
        try:
            return datetime.date.fromisoformat(text)
        except ValueError:
            raise VersionError(f"{text!r} is not a calendar date (YYYY-MM-DD)") from None
    m = RELEASE.fullmatch(text)
    if m is None:
        raise VersionError(f"expected a date (YYYY-MM-DD) or a release <family>-<version> such as cpu-0.33.0 "
                           f"(numbers of at most {MAX_DIGITS} digits), got {_shown(text)}")
    return m.group(1), version_key(m.group(2))
