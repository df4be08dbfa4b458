"""The one place that decides what is secret, and the masking every boundary applies before text
leaves servematrix: reports, the logs it writes (server.log, lm_eval.log), printed commands.

What is secret:
  (a) the value of a secret-named environment variable (HF_TOKEN, *_API_KEY, *PASSWORD*, ...);
  (b) every value given to a credential flag in an argv (`--api-key K`, `--hf-token=T`, ...);
  (c) the password of a URL's `user:password@` (the user and the host stay readable);
  (d) once known, a secret value is masked wherever else it appears: in the same text, and, for
      the values a LaunchSpec registered with `remember`, in everything this process writes.

Printed commands also go through here (`shell_command`, `one_line`), so that what is pasted runs
only what servematrix meant: environment names checked, every word quoted, comments one line.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shlex
import threading
import unicodedata
from collections.abc import Iterable, Mapping

MASK = "***"

# TOKEN but not TOKENIZER(S)/..._TOKENS (counts, switches), AUTH but not AUTHOR (GIT_AUTHOR_NAME):
# since every value of a secret name is now masked, at any length, a false positive would mask
# "false" or a person's name in every report.
_SECRET_NAME = re.compile(
    r"(TOKEN(?!IZER|S\b|S_)|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|AUTH(?!OR))", re.I)

# Values that are switches, not credentials (HF_HUB_DISABLE_IMPLICIT_TOKEN=1): masking every
# standalone "1" or "false" would corrupt the JSON reports ("tp": ***) and hide nothing.
_SWITCHES = frozenset({"0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"})

# Values this long are masked wherever they occur, even inside a longer word (a token glued to
# "Bearer" or percent-encoding). Shorter ones only as a whole token: where they do not touch a
# letter or digit on a side where the value itself begins/ends with one, so a 4-character secret
# "ab12" is masked in "--api-key ab12" or "'ab12'" but "1" would not eat the 1 of "tp1".
SUBSTRING_MIN = 6
_ALNUM = "A-Za-z0-9_"  # '_' joins words in identifiers and JSON keys ("token_ids")

# Flags whose value is a credential, by their long name ('_' spelled '-', as vLLM's parser does).
CREDENTIAL_FLAGS = frozenset({
    "--api-key", "--hf-token", "--token", "--auth-token", "--access-token", "--password", "--passwd",
    "--secret", "--secret-key", "--access-key", "--client-secret",
})
MULTI_VALUE_FLAGS = frozenset({"--api-key"})  # vLLM: --api-key API_KEY [API_KEY ...]

# scheme://user:password@ ; the password may hold '@' or ':' (unencoded), never '/', space, quote
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"]*):([^\s/?#'\"]+)@")
_FLAG_IN_TEXT = re.compile(
    r"(?<![\w-])(--[A-Za-z][\w-]*)(?:=|[ \t]+)(?!--)('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"]+)")
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # the one rule for environment names (yamlio.EnvName uses it too)
ENV_KEY = re.compile(ENV_NAME[:-1] + r"\Z")  # Python's $ would let a trailing newline through

_known: frozenset[str] = frozenset()  # values registered by `remember`, for the process's life
_known_lock = threading.Lock()


# --- what is secret ---------------------------------------------------------------------------
# Names that *describe* a credential rather than hold one (RAY_AUTH_MODE=token, HF_TOKEN_PATH,
# *_AUTH_TYPE=basic): their values are common words or paths, and masking them everywhere corrupts
# the reports (Ray's RAY_AUTH_MODE=token turned every "token_ids" key into "***_ids").
_DESCRIBES = re.compile(r"_(MODE|TYPE|METHOD|KIND|PATH|FILE|DIR|SOCK|ENABLED?|DISABLED?|REQUIRED|PROVIDER)$", re.I)


def is_secret(name: str) -> bool:
    """Is this environment variable's name one that holds a credential?"""
    return bool(_SECRET_NAME.search(name)) and not _DESCRIBES.search(name)


def _worth_masking(value: str) -> bool:
    return bool(value) and value.lower() not in _SWITCHES and value != MASK


def _flag_name(arg: str) -> tuple[str, bool, str]:
    name, eq, value = arg.partition("=")
    return name.lower().replace("_", "-"), bool(eq), value


def argv_secrets(argv: Iterable[str]) -> dict[int, str]:
    """Position → value of every credential flag's value in argv (rule b; `--flag=value` too).
    A single-value flag takes the next word unless it is another flag; --api-key takes every
    following word up to the next option, as vLLM's parser does."""
    argv, found = list(argv), {}
    i = 0
    while i < len(argv):
        name, eq, value = _flag_name(argv[i])
        i += 1
        if name not in CREDENTIAL_FLAGS:
            continue
        if eq:
            found[i - 1] = value
            continue
        multi = name in MULTI_VALUE_FLAGS
        while i < len(argv) and not argv[i].startswith("--" if not multi else "-"):
            found[i] = argv[i]
            i += 1
            if not multi:
                break
    return found


def env_secrets(env: Mapping[str, str]) -> set[str]:
    """Values of secret-named variables (rule a) and URL passwords in any variable (rule c)."""
    out = {v for k, v in env.items() if is_secret(k)}
    for v in env.values():
        out.update(url_passwords(v))
    return {v for v in out if _worth_masking(v)}


def url_passwords(text: str) -> set[str]:
    if "@" not in text or "://" not in text:  # the common case, and the regex is slow on long text
        return set()
    return {m.group(2) for m in _URL_PASSWORD.finditer(text)}


# `NAME=value` in free text (a .env line echoed by an error, a shell line in a log): the value of a
# secret-named variable is secret there too (rule a). Upper-case names and `=` only, as a shell or
# a .env file writes them: a log's `prompt_token_ids=[1, 2]` or a JSON "token_ids": [...] is no
# assignment of a credential.
_ASSIGNMENT = re.compile(r"(?<![\w-])([A-Z_][A-Z0-9_]*)=('[^'\n]*'|\"[^\"\n]*\"|[^\s'\",;]+)")


def text_secrets(text: str) -> set[str]:
    """Secrets that free text gives away by itself: URL passwords, values of credential flags
    (`--api-key K` in a printed command), except the flag's own metavar in a usage message, and
    values assigned to secret-named variables (`HF_TOKEN=hf_...`)."""
    out = url_passwords(text)
    if "=" in text:
        for m in _ASSIGNMENT.finditer(text):
            if is_secret(m.group(1)):
                value = m.group(2)
                out.add(value[1:-1] if value[0] in "'\"" and len(value) > 1 and value[-1] == value[0] else value)
    for m in _FLAG_IN_TEXT.finditer(text):
        name, value = m.group(1).lower().replace("_", "-"), m.group(2)
        if name in CREDENTIAL_FLAGS:
            if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:  # a quoted word
                value = value[1:-1]
            if value.strip("[]").upper() != name[2:].upper().replace("-", "_"):  # `--api-key API_KEY`
                out.add(value)
    return {v for v in out if _worth_masking(v)}


def remember(values: Iterable[str]) -> None:
    """Register values known to be secret (a launch spec's credentials): from now on every text
    this process redacts (logs, reports, printed commands) masks them too."""
    global _known
    new = {v for v in values if _worth_masking(v)}
    if new - _known:
        with _known_lock:
            _known = _known | new


def remember_launch(argv: Iterable[str], env: Mapping[str, str]) -> None:
    """Register the credentials a command line and its environment hold (rules a-c). Called when a
    server is launched, and already when a scenario file is read (config.scenario): a value that
    reappears in a field the user wrote (an xfail reason, a signature) is then masked in every
    report, record and printed line, not only in the commands (rule d)."""
    argv = list(argv)
    values = {*argv_secrets(argv).values(), *env_secrets(env)}
    for arg in argv:
        values.update(url_passwords(arg))
    remember(values)


def forget() -> None:
    """Drop every registered value (tests)."""
    global _known
    with _known_lock:
        _known = frozenset()


# --- masking ----------------------------------------------------------------------------------
def _alternative(value: str) -> str:
    esc = re.escape(value)
    if len(value) >= SUBSTRING_MIN:
        return esc
    left = f"(?<![{_ALNUM}])" if value[0].isascii() and (value[0].isalnum() or value[0] == "_") else ""
    right = f"(?![{_ALNUM}])" if value[-1].isascii() and (value[-1].isalnum() or value[-1] == "_") else ""
    return f"{left}{esc}{right}"


@functools.lru_cache(maxsize=64)
def _pattern(values: tuple[str, ...]) -> re.Pattern:
    # longest first: a secret that contains another is masked whole
    return re.compile("|".join(_alternative(v) for v in sorted(values, key=lambda v: (-len(v), v))))


@functools.lru_cache(maxsize=1024)
def _forms(value: str) -> frozenset[str]:
    """The value as written, and as the reports escape it (JSON strings, HTML): a password holding
    a quote is `a\\"b` in summary.json and `a&quot;b` in report.html."""
    return frozenset({value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1], html.escape(value)})


def _mask(text: str, values: Iterable[str]) -> str:
    values = tuple(sorted({f for v in values for f in _forms(v)}))
    if not values or not text:
        return text
    return _pattern(values).sub(MASK, text)


def _values(text: str, environ: Mapping[str, str] | None, extra: Iterable[str] = ()) -> set[str]:
    environ = os.environ if environ is None else environ
    return {*env_secrets(environ), *_known, *text_secrets(text), *extra}


def _redact(text: str, env_values: Iterable[str]) -> str:
    return _mask(text, {*env_values, *_known, *text_secrets(text)})


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Mask every secret in free text: values of secret-named variables of `environ` (default
    os.environ), registered values, and what the text itself reveals (URL passwords, credential
    flags' values), each wherever it appears in the text."""
    return _redact(text, env_secrets(os.environ if environ is None else environ))


def redact_bytes(data: bytes, environ: Mapping[str, str] | None = None) -> bytes:
    """redact_text for a child's raw output; bytes that are not UTF-8 pass through unchanged."""
    return _redact_bytes(data, env_secrets(os.environ if environ is None else environ))


def _redact_bytes(data: bytes, env_values: Iterable[str]) -> bytes:
    return _redact(data.decode("utf-8", "surrogateescape"), env_values).encode("utf-8", "surrogateescape")


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as it may be shown: secret-named values replaced by the mask, any other
    value with its secrets (URL passwords, known values) masked."""
    known = env_secrets(env)
    return {k: (MASK if is_secret(k) else _mask(v, _values(v, None, known))) for k, v in env.items()}


def redact_argv(argv: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The argv as it may be shown: credential flags' values replaced by the mask (`--flag=***`
    for the joined form), and every secret found in it masked in every other word too."""
    argv = list(argv)
    flagged = argv_secrets(argv)
    values = _values("\0".join(argv), environ, flagged.values())
    out = []
    for i, arg in enumerate(argv):
        if i in flagged:
            out.append(f"{arg.partition('=')[0]}={MASK}" if arg.startswith("-") and "=" in arg else MASK)
        else:
            out.append(_mask(arg, values))
    return out


# --- printing safely --------------------------------------------------------------------------
def check_env_keys(env: Iterable[str]) -> None:
    """Refuse a name that is not a shell variable name: `A;rm -rf ~=1` printed before a command
    would run whatever follows the `;` when pasted (and no process can be given it anyway)."""
    from servematrix.errors import ConfigError

    for key in env:
        if not ENV_KEY.match(key):
            raise ConfigError("environment", None, repr(key),
                              "not a valid variable name (letters, digits and _, not starting with a digit)")


def shell_command(argv: Iterable[str], env: Mapping[str, str] | None = None) -> str:
    """`NAME=value ... argv` as a shell takes it, secrets masked: names checked, values and words
    quoted (a mask too: an unquoted *** would be a glob)."""
    env = dict(env or {})
    check_env_keys(env)
    words = [f"{k}={shlex.quote(v)}" for k, v in redact_env(env).items()]
    argv = list(argv)
    if argv:
        words.append(shlex.join(redact_argv(argv)))
    return " ".join(words)


_LINE_BREAKING = {"Cc", "Zl", "Zp"}  # control characters (\n, \r, ESC, ...), line/paragraph separators


def one_line(text: str) -> str:
    """Text for a `# ...` comment line: secrets masked, and every control character or line
    separator collapsed to a space, so nothing after it can start a new (command) line or redraw
    the terminal."""
    text = redact_text(text)
    return "".join(" " if unicodedata.category(c) in _LINE_BREAKING else c for c in text)


_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, format (bidi overrides), separators
MAX_FIELD = 200  # characters of one value in a table row (an id, a reason): enough for any real one


def terminal(text: object, width: int | None = MAX_FIELD) -> str:
    """A value read from a file or database (an id, a reason, a signature) as it may be printed:
    secrets masked, every control or format character and line separator shown as an escape
    (\\x1b, \\n, \\u202e), so it can neither redraw the terminal nor forge a line of output;
    and at most `width` characters (None: unbounded), cut in the middle with '…' so that both its
    start and its end stay readable. Every printer of such values goes through here."""
    text = redact_text(str(text))
    if any(unicodedata.category(c) in _UNPRINTABLE for c in text):
        text = "".join(c if unicodedata.category(c) not in _UNPRINTABLE else _escape(c) for c in text)
    if width is not None and len(text) > width:
        head = max(1, (width - 1) * 2 // 3)
        tail = max(0, width - 1 - head)
        text = text[:head] + "…" + (text[-tail:] if tail else "")
    return text


def _escape(c: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or \
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")


def column_width(values: Iterable[str], least: int = 0, width: int = MAX_FIELD) -> int:
    """The width a table column of `values` (as `terminal` shows them) is padded to: the longest,
    never more than `width` (a 1 MB id must not pad every row to 1 MB)."""
    return min(width, max([least, *(len(v) for v in values)]))


# --- a child's output, redacted on its way into a log ------------------------------------------
class LineRedactor:
    """Feeds arbitrary chunks, gives back whole lines redacted (a secret split across two chunks is
    still seen whole). A line ends at \\n or \\r (progress bars redraw with \\r); a line longer than
    MAX_LINE is cut, so a child that never ends a line cannot grow the buffer without bound."""

    MAX_LINE = 1 << 16

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._partial = b""
        # the child's environment is fixed when it starts: its secrets are found once, not per
        # line (reading os.environ costs more than redacting a line)
        self._env_values = env_secrets(os.environ if environ is None else environ)

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if cut == 0 and len(data) > self.MAX_LINE:
            cut = len(data)
        self._partial = data[cut:]
        return _redact_bytes(data[:cut], self._env_values) if cut else b""

    def flush(self) -> bytes:
        """The unfinished last line (the child is gone, or its log is being read now)."""
        data, self._partial = self._partial, b""
        return _redact_bytes(data, self._env_values) if data else b""

