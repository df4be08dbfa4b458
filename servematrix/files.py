"""Files of a run directory: every report is written atomically (a killed run keeps the last
complete version of each), with the mode a new file would get; a place is checked before anything
is written to it; `latest` points at the newest run.

A base module, below every stage (like paths.py and versions.py): the run, the reports, the sweep,
the mirror and the CLI all write through it, so it imports no stage; parked in report/ it made the
mirror depend on the report stage for a file write."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from servematrix.errors import StateError
from servematrix.redact import redact_text


def writable_target(path: Path) -> Path:
    """The file a write to `path` lands in: `path`, or the regular file a symlink there names (the
    link is kept). Anything else already there — a directory, device, FIFO, socket, a dangling
    link — is not a report of ours: StateError, nothing written."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a symlink
    except FileNotFoundError:
        if path.is_symlink():
            raise StateError(path, f"is a symlink to a missing file ({os.readlink(path)}); not written") from None
        return path
    except OSError as exc:
        raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        link = " (through a symlink)" if path.is_symlink() else ""
        raise StateError(path, f"is {_file_kind(st.st_mode)}{link}, not a regular file; not overwritten")
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file beside the target and rename it over (a reader never sees half a report),
    keeping the target's mode; a new file gets 0666 less the umask, like any other file."""
    target = writable_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # 0600
    except OSError as exc:
        raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            f.write(redact_text(text))
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StateError(path, f"cannot be written: {exc.strerror or exc}") from exc
        raise


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would race the runner's threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


RUN_MARKER = "summary.json"  # a directory holding one holds a run


def check_dir(path: Path) -> None:
    """`path` is a directory this process can write in, or one it can create: not a file, not
    under a file, not in a read-only place. Nothing is created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise StateError(path, "exists and is not a directory")
        require_writable(path)
    else:
        require_writable(_nearest_existing(path))


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path("/")


def require_writable(directory: Path) -> None:
    if not directory.is_dir():
        raise StateError(directory, "is not a directory; nothing can be created under it")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StateError(directory, "is not writable")


def point_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def page_name(scenario_id: str) -> str:
    """scenario-<id>.html, the id made a file name one-to-one: characters other than letters,
    digits, '.' and '-' become _XX (hex), so `a/tp1` and `a_tp1` cannot collide."""
    return "scenario-" + re.sub(r"[^A-Za-z0-9.-]", lambda m: "".join(f"_{b:02X}" for b in m.group().encode()),
                                scenario_id) + ".html"
