"""Config fields the mirror adds or changes per family, as mirror-families.yaml states them:
`model_type_config` (fields vLLM reads that transformers' configuration class does not default,
filled where a source lacks them) and `cpu_config` (values a twin served on vLLM's CPU backend
must take instead of the real ones).

Separate from plan_config.py, which shrinks the config the source has: these are the fields the
source does not have, or has in a form this device cannot serve.
"""

from __future__ import annotations

from typing import Any

from servematrix.errors import ConfigError
from servematrix.mirror.layout import rules

__all__ = ["cpu_overrides", "missing_fields"]


def missing_fields(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """The family's fields (model_type_config) that `config` does not carry, with their values:
    a literal, or `{of: FIELD, times: X}` evaluated on `config` (which should hold the class's
    defaults, so FIELD is there where the checkpoint leaves it to them). A field `config` has,
    even as another value, is never in the result: the checkpoint's own value wins."""
    wanted = (rules().get("model_type_config") or {}).get(model_type) or {}
    out = {}
    for key, value in wanted.items():
        if config.get(key) is None:
            out[key] = _value(model_type, key, value, config)
    return out


def _value(model_type: str, key: str, value: Any, config: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        return value
    if set(value) == {"from", "map"}:  # a per-layer list in another spelling (mimo_v2_flash: layer_types ->
        # hybrid_layer_pattern): each entry of FIELD's list mapped, so the list follows the layers kept
        base = config.get(value["from"])
        if not isinstance(base, list) or any(v not in value["map"] for v in base):
            raise ConfigError("mirror-families.yaml", None, f"model_type_config.{model_type}.{key}",
                              f"a rule {{from: FIELD, map: {{...}}}} maps every entry of a list FIELD the config has "
                              f"(got {value['from']!r} = {base!r:.80})")
        return [value["map"][v] for v in base]
    base = config.get(value.get("of"))
    if set(value) != {"of", "times"} or not isinstance(base, (int, float)) or isinstance(base, bool):
        raise ConfigError("mirror-families.yaml", None, f"model_type_config.{model_type}.{key}",
                          f"a rule is {{of: FIELD, times: X}} over a numeric field the config has "
                          f"(got {value!r}, {value.get('of')!r} = {base!r})")
    return round(base * value["times"])


def cpu_overrides(model_type: str, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`config` with the family's cpu_config values set where it holds another value, and one
    note per changed field (the source's value, the twin's, why)."""
    wanted = (rules().get("cpu_config") or {}).get(model_type) or {}
    out, notes = dict(config), []
    for key, rule in wanted.items():
        if key in out and out[key] != rule["value"]:
            notes.append(f"{key} {out[key]!r} -> {rule['value']!r} for vLLM's CPU backend "
                         f"(mirror-families.yaml cpu_config): {rule['reason']}")
            out[key] = rule["value"]
    return out, notes
