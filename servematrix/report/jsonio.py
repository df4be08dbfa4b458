"""JSON that servematrix wrote once and reads back untrusted (summary.json, the history's rows):
parsed within bounds, every refusal a ValueError with one readable line, so a damaged or hostile
file is said to be one by its reader instead of escaping as an internal error.

Python's json module has two refusals that are not JSONDecodeError: RecursionError for arrays or
objects nested some thousands deep, and ValueError for an integer of more than 4,300 digits; and
no size limit at all (a 3 GB file is read whole before the first byte is judged)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# A summary of the largest sweep holds some thousands of records of a few KB each; this is far
# above that and low enough that a wrong file (a model's weights, a sparse file) is refused at once.
MAX_BYTES = 256 << 20


class JSONRefused(ValueError):
    """Valid or invalid, this JSON is not read: `str()` says why in one line."""


def loads(text: str | bytes) -> Any:
    """json.loads, with its RecursionError and its over-long-integer ValueError said as JSONRefused
    (a JSONDecodeError, a ValueError too, passes unchanged: its callers name line and column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JSONRefused("nested too deep to be one servematrix wrote") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise JSONRefused(f"holds a value Python cannot read ({str(exc).split(';')[0]})") from None


def read_text(path: Path) -> str:
    """The file's text, refused (JSONRefused) beyond MAX_BYTES before a byte of it is read."""
    size = os.stat(path).st_size
    if size > MAX_BYTES:
        raise JSONRefused(f"{size} bytes, more than {MAX_BYTES} (the limit for a file servematrix writes); "
                          "not one it wrote")
    return Path(path).read_text(encoding="utf-8")
