"""YAML loading that remembers where every value came from, so a bad field is reported as
`file:line: field: problem` instead of a bare pydantic dump.

Every configuration file is untrusted input: `load_yaml` accepts only UTF-8 text of bounded size,
nesting and alias expansion, and turns anything YAML or Python refuses into a ConfigError at its
line. The field types every configuration model shares are in fields.py."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from servematrix.errors import ConfigError
from servematrix.redact import redact_text

__all__ = ["ConfigError", "Located", "load_yaml", "validate", "field_error", "is_file", "not_a_file"]

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]

# A matrix or scenario file is a few KB; these limits are far above any real one and low enough
# that a hostile or broken file is refused before it costs time or memory.
MAX_FILE_BYTES = 1 << 20  # 1 MiB of text
MAX_DEPTH = 32  # nesting of mappings/sequences, counted with every alias expanded
MAX_NODES = 100_000  # values in the document with every alias expanded ("billion laughs")


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not build (too deep, too large, a recursive alias, a value
    Python cannot hold): reported with its own message, not as "malformed YAML"."""

    def __init__(self, message: str, mark):
        super().__init__(problem=message, problem_mark=mark)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override hides typos), recursive aliases,
    and documents nested or expanded beyond MAX_DEPTH / MAX_NODES."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0  # nesting of the node being composed
        self._reach = 0  # deepest expanded level seen below it
        self._expanded = 0  # values composed so far, aliases counted at their full size
        self._sizes: dict[str, int] = {}  # anchor -> expanded values under it
        self._heights: dict[str, int] = {}  # anchor -> expanded levels under it
        self._open: set[str] = set()  # anchors whose node is still being composed

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return self._compose_alias(parent, index)
        event = self.peek_event()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels (the limit; a configuration needs a handful)",
                           event.start_mark)
        self._grow(1, event.start_mark)
        before, saved_reach, self._reach = self._expanded, self._reach, self._depth
        if event.anchor is not None:
            self._open.add(event.anchor)
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self._open.discard(event.anchor)
            self._sizes[event.anchor] = self._expanded - before
            self._heights[event.anchor] = self._reach - self._depth
        self._reach = max(saved_reach, self._reach)
        self._depth -= 1
        return node

    def _compose_alias(self, parent, index):
        event = self.peek_event()
        if event.anchor in self._open:
            raise _Refused(f"alias *{event.anchor} is used inside the node &{event.anchor} it names (a recursive "
                           "structure); an alias may only repeat a complete node", event.start_mark)
        node = super().compose_node(parent, index)  # refuses an undefined alias
        reach = self._depth + 1 + self._heights.get(event.anchor, 0)
        if reach > MAX_DEPTH:
            raise _Refused(f"alias *{event.anchor} nests the document deeper than {MAX_DEPTH} levels (the limit)",
                           event.start_mark)
        self._reach = max(self._reach, reach)
        self._grow(self._sizes.get(event.anchor, 1), event.start_mark)
        return node

    def _grow(self, values: int, mark) -> None:
        self._expanded += values
        if self._expanded > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values once aliases are expanded (the limit; an alias "
                           "bomb?): repeat less through aliases", mark)

    def construct_object(self, node, deep=False):
        # Python refuses some values YAML resolves (a 5000-digit int, 2001-13-45 as a date): say
        # where, instead of letting a ValueError escape
        try:
            data = super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            # the first clause only: Python's advice (sys.set_int_max_str_digits) is not the user's
            raise _Refused(f"cannot read this value: {str(exc).split(';')[0]}", node.start_mark) from exc
        if isinstance(data, str) and _SURROGATE.search(data):
            raise _Refused("a \\uD800-\\uDFFF escape is half of a UTF-16 pair, not a character", node.start_mark)
        return data


_SURROGATE = re.compile("[\ud800-\udfff]")


def _yaml11_number(loader: _LineLoader, node: yaml.ScalarNode):
    """An int or float PyYAML resolved by YAML 1.1's rules, refused where those rules read it as
    another number than it shows: 010 is octal 8, 1:30 is sexagesimal 90, 0b11 is 3, 1_000 is 1000
    (YAML 1.2, and every reader of docs/boundary.md's "strict integers", reads 10, text, text, text).
    Decimal, 0x.. and the usual float forms are read as they are."""
    text = node.value.strip()
    body = text.lstrip("+-")
    why = ("a ':' (YAML 1.1 reads 1:30 as the base-60 number 90)" if ":" in text
           else "a '_' (YAML 1.1 drops it: 1_000 is 1000)" if "_" in text
           else "a 0b prefix (YAML 1.1 binary)" if body.lower().startswith("0b")
           else "a leading zero (YAML 1.1 reads 010 as octal 8)"
           if node.tag.endswith(":int") and len(body) > 1 and body[0] == "0" and body[1:2].isdigit()
           else None)
    if why is not None:
        raise _Refused(f"{text!r} is a number written with {why}: write it as a plain decimal number, "
                       "or quote it if it is text", node.start_mark)
    ctor = yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else yaml.SafeLoader.construct_yaml_float
    return ctor(loader, node)


# YAML 1.2's booleans (its core schema); YAML 1.1 also reads yes/no/on/off (any case) as booleans
_BOOLEANS = {"true", "True", "TRUE", "false", "False", "FALSE"}


def _yaml11_boolean(loader: _LineLoader, node: yaml.ScalarNode):
    """A boolean PyYAML resolved by YAML 1.1's rules, refused where it is written as yes/no/on/off:
    a field that wants text (a name, a quant, a release) would get True instead of the word, and a
    switch written `off` reads as a word to everyone but YAML 1.1 (Norway's `no` is the classic).
    The same rule as _yaml11_number: only what YAML 1.2 reads the same way is accepted."""
    if node.value not in _BOOLEANS:
        raise _Refused(f"{node.value!r} is a YAML 1.1 boolean (read as {str(node.value.lower() in {'yes', 'on'}).lower()}): "
                       "write true or false, or quote it if it is text", node.start_mark)
    return yaml.SafeLoader.construct_yaml_bool(loader, node)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # a list or mapping as a key: no configuration field is named that way
            raise _Refused("a key must be a plain value, not a list or mapping", key_node.start_mark) from None
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:int", _yaml11_number)
_LineLoader.add_constructor("tag:yaml.org,2002:float", _yaml11_number)
_LineLoader.add_constructor("tag:yaml.org,2002:bool", _yaml11_boolean)


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int], loader: _LineLoader | None = None) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _key(key_node, loader)
            # the key's own line, so "unknown field" points at the key
            out[loc + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, loc + (key,), out, loader)
            out[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), out, loader)


def _key(key_node: yaml.Node, loader: _LineLoader | None):
    """A key as the data holds it (`~` is None, `1` is 1), so a location pydantic reports for a key
    that is not text finds its line; a plain text key is its own value."""
    if loader is None or not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":str"):
        return key_node.value
    try:
        key = loader.construct_object(key_node)
    except yaml.YAMLError:
        return key_node.value
    return key if isinstance(key, (str, int, float, bool, type(None))) else key_node.value


class Located:
    """Parsed YAML data plus a map from a location (keys/indices) to its line."""

    def __init__(self, path: Path, data: Any, lines: dict[Loc, int], text: str = ""):
        self.path, self.data, self.lines, self.text = path, data, lines, text

    def line_of(self, loc: Loc) -> int | None:
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())

    def error(self, loc: Loc, message: str) -> ConfigError:
        field = ".".join(str(p) for p in loc) or None
        return ConfigError(self.path, self.line_of(loc), field, message)


def load_yaml(path: Path | str) -> Located:
    path = Path(path)
    text = _read_text(path)
    _check_printable(path, text)
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
        lines: dict[Loc, int] = {}
        if node is not None:
            _index_lines(node, (), lines, loader)
    except _Refused as exc:
        raise ConfigError(path, exc.problem_mark.line + 1, None, exc.problem) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(path, mark.line + 1 if mark else None, None, f"malformed YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:  # a ReaderError: _check_printable saw its characters first
        raise ConfigError(path, None, None, f"malformed YAML: {' '.join(str(exc).split())}") from exc
    finally:
        loader.dispose()
    return Located(path, data, lines, text)


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, at most MAX_FILE_BYTES. Opened without blocking and checked to be a
    regular file before a byte is read: a FIFO named like a configuration file would hang the
    command, a device would never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(path, None, None, not_a_file(path) or f"cannot read: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(path, None, None, not_a_file(path) or "not a regular file")
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(path, None, None, f"larger than {MAX_FILE_BYTES} bytes (the limit for a configuration file)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                            "save the file as UTF-8") from None


def _check_printable(path: Path, text: str) -> None:
    """Refuse what YAML refuses to read (control characters) at its line: PyYAML's own ReaderError
    gives only an offset."""
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise ConfigError(path, line, None, f"control character U+{ord(bad.group()):04X} at column {column}: YAML "
                                            "allows only printable text (write it as an escape in a double-quoted "
                                            "string)")


def not_a_file(path: Path) -> str | None:
    """Why something at `path` is not a configuration file servematrix can read — a directory, a
    FIFO, a device, a symlink that loops or points nowhere — or None (a regular file, or nothing
    there at all: the caller says what is missing)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"is a symlink to a missing file ({os.readlink(path)})" if os.path.islink(path) else None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink that loops (it never reaches a file)"
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
    return f"is {kind}, not a YAML file"


def is_file(path: Path) -> bool:
    """Path.is_file, with what it does not swallow (a directory this user may not search, a name
    too long) said as a configuration error at that path."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc.strerror or exc}") from None


def field_error(at: Loc, message: str) -> PydanticCustomError:
    """An error a model validator raises for one of its fields (or deeper): `validate` reports it
    at `at` below the model's own location, with that field's line."""
    return PydanticCustomError("servematrix_field", "{message}", {"message": message, "at": tuple(at)})


def validate(located: Located, model: type[M], data: Any = None, loc_prefix: Loc = ()) -> M:
    """Validate `data` (default: the whole file) as `model`; the first error becomes a ConfigError."""
    payload = located.data if data is None else data
    if payload is None:
        raise ConfigError(located.path, None, None, "file is empty")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        # an unknown key is usually a typo of a missing one: report it first
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = loc_prefix + _data_loc(payload, err["loc"]) + (err.get("ctx") or {}).get("at", ())
        msg = "unknown field" if err["type"] == "extra_forbidden" else _message(err)
        extra = f" ({len(exc.errors()) - 1} more error(s))" if len(exc.errors()) > 1 else ""
        raise located.error(loc, msg + extra) from None


def _message(err: dict) -> str:
    """pydantic's message for a refused value, plus ` (got X)` for a scalar refused by one of
    pydantic's own constraints, so the line says what was there as well as what is wanted (our
    validators' messages say it themselves)."""
    if err["type"] == "value_error":
        return err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] in {"missing", "servematrix_field"} or not isinstance(value, (str, int, float, bool)):
        return err["msg"]
    if any(part in ("env", "args") for part in err["loc"]):  # may hold a secret: never echoed
        return err["msg"]
    # masked before it is cut: a secret cut in half would no longer be recognised
    shown = repr(redact_text(value) if isinstance(value, str) else value)
    return f"{err['msg']} (got {shown[:60] + '...' if len(shown) > 60 else shown})"


def _data_loc(data: Any, loc: Loc) -> Loc:
    """pydantic's location of an error as a path through `data`: a part that is a key or index of
    the data there is kept whatever it looks like (a key may hold '[' or an escape), and only a part
    the data does not hold is judged as pydantic's union tag (dropped) or a missing field (kept)."""
    out: list = []
    here, inside = data, True
    for part in loc:
        if inside and isinstance(here, dict) and not _has(here, part):
            # a key that is not text is named by its str() in pydantic's "Keys should be strings"
            part = next((k for k in here if not isinstance(k, str) and str(k) == part), part)
        if inside and isinstance(here, dict) and _has(here, part):
            out.append(part)
            here = here[part]
        elif inside and isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
            out.append(part)
            here = here[part]
        elif not _is_union_tag(part):
            out.append(part)
            inside = False
    return tuple(out)


def _has(mapping: dict, key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable part
        return False


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the union member's type name ("function-after[...]", "int") into loc
    return isinstance(part, str) and ("[" in part or part in {"int", "str", "float", "bool", "list", "dict"})
