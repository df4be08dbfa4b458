"""The one root of everything a user can get wrong: a file, a value, an argument, or the state of
something on disk (a damaged report, a locked database). `cli.main` turns any `UserError` into
exit 2 and one line; nothing else in the package prints an error of this kind."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Exit 2 territory: the user can fix it. `str()` is the whole line that is printed."""


class ConfigError(UserError):
    """A problem located in a file: `file:line: field: message`."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")


class ArgumentError(UserError):
    """A bad command-line argument: `--flag: message` (what would be accepted)."""

    def __init__(self, argument: str, message: str):
        self.argument, self.message = argument, message
        super().__init__(f"{argument}: {message}")


class StateError(UserError):
    """Something on disk servematrix cannot use as it is: a damaged summary.json or database, a
    target that is not ours to overwrite, a directory that already holds a run."""

    def __init__(self, path: Path | str, message: str):
        self.path, self.message = str(path), message
        super().__init__(f"{path}: {message}")
