"""The run directory: claimed for a run (or a bisect) before anything is written — refused when it
cannot be used, already holds a run (unless --overwrite), or the history beside it is damaged."""

from __future__ import annotations

from pathlib import Path

from servematrix.errors import StateError
from servematrix.report import history
from servematrix.files import RUN_MARKER, check_dir, require_writable


def check(out: Path, overwrite: bool = False, marker: str = RUN_MARKER) -> None:
    """Refuse, before anything is written, a run directory servematrix cannot or must not use: a
    file, a place that cannot be created or written, one that already holds a run (unless
    `overwrite`), or a `latest` beside it that is not the link servematrix keeps."""
    out = Path(out)
    if out.is_dir() and (out / marker).exists() and not overwrite:
        raise StateError(out, f"already holds a run ({marker}); nothing written: choose another --out "
                              "(run and bisect take --overwrite to write over it)")
    check_dir(out)
    if out.is_dir():
        require_writable(out.parent)  # `latest` and history.sqlite live beside the run
    latest = out.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        raise StateError(latest, "exists and is not the symlink servematrix keeps; not replaced")


def claim(out: Path, overwrite: bool = False) -> None:
    """Take `out` for a run: checked (with the history beside it) before anything is written."""
    check(out, overwrite)
    history.check(history.db_path(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(out, f"cannot be created: {exc.strerror or exc}") from exc
