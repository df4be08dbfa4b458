"""YAML loading that remembers where every value came from, so a bad field is reported as
`file:line: field: problem` instead of a bare pydantic dump."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from servematrix.errors import ConfigError

__all__ = ["ConfigError", "Located", "load_yaml", "validate"]

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override hides typos)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            # the key's own line, so "unknown field" points at the key
            out[loc + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, loc + (key,), out)
            out[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), out)


class Located:
    """Parsed YAML data plus a map from a location (keys/indices) to its line."""

    def __init__(self, path: Path, data: Any, lines: dict[Loc, int]):
        self.path, self.data, self.lines = path, data, lines

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
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(path, mark.line + 1 if mark else None, None, f"malformed YAML: {exc.problem or exc}") from exc
    lines: dict[Loc, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return Located(path, data, lines)


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
        loc = loc_prefix + tuple(p for p in err["loc"] if not _is_union_tag(p))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        extra = f" ({len(exc.errors()) - 1} more error(s))" if len(exc.errors()) > 1 else ""
        raise located.error(loc, msg + extra) from exc


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the union member's type name ("function-after[...]", "int") into loc
    return isinstance(part, str) and ("[" in part or part in {"int", "str", "float", "bool"})
