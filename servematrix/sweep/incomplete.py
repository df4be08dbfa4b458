"""`twin-incomplete`: a cell whose load check missed something the twin lacks but the family's real
checkpoints have. Such a cell says nothing about vLLM, so it is neither `pass` nor `fail`: it is
counted and listed in the reports, with what the twin lacks, until the twin's data carries it.

What vLLM read is known from the load check itself: every rank lists the config attributes the
model asked for and the config lacked (serve/loadcheck_worker.py's recording config, also where the
model code catches the AttributeError), and a load that leaves parameters uninitialised names them.
Two kinds of miss are the twin's:

- a config field the twin's config.json does not carry but a published config of the family does
  (data/configs: the corpus). A field the twin's config.json carries and the config object still
  lacks was dropped by the configuration class on reading: the real checkpoint loses it the same
  way, so that miss is not the twin's;
- a tensor vLLM expects under a checkpoint name that transformers renames on load (its conversion
  mapping for the model_type): the twin, saved by transformers, holds the renamed tensor instead.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from servematrix.record import Failure

_ATTRIBUTE = re.compile(r"object has no attribute '(\w+)'")
_NOT_INITIALIZED = re.compile(r"not initialized from checkpoint: \{([^}]*)\}")
# a model that checks the field itself: hy_v3's "first_k_dense_replace not exist,please check config"
_NOT_EXIST = re.compile(r"\b(\w+) not exist")


def rank_misses(loadcheck_dir: Path) -> list[str]:
    """The config attributes any rank asked for and lacked, in the order first read."""
    out: list[str] = []
    for path in sorted(loadcheck_dir.glob("rank*.json")):
        try:
            out += json.loads(path.read_text()).get("config_misses") or []
        except (OSError, json.JSONDecodeError):
            continue
    return list(dict.fromkeys(out))


def config_class(loadcheck_dir: Path) -> str | None:
    """The config class vLLM read the twin's config.json with (module.name), as a rank recorded it."""
    for path in sorted(loadcheck_dir.glob("rank*.json")):
        try:
            name = json.loads(path.read_text()).get("config_class")
        except (OSError, json.JSONDecodeError):
            continue
        if name:
            return name
    return None


@lru_cache(maxsize=64)
def _published_object_lacks(model_type: str, field: str) -> bool:
    """Whether transformers' configuration class, given the family's published config, ends up
    without `field` (it folds it into another): then the real checkpoint read by that class misses
    it exactly as the twin does."""
    from transformers import AutoConfig

    from servematrix.sweep import corpus

    entry = corpus.published(model_type)
    if entry is None:
        return False
    given = {k: v for k, v in entry.config().items() if k not in ("model_type", "auto_map", "quantization_config")}
    try:
        return not hasattr(AutoConfig.for_model(model_type, **given), field)
    except Exception:  # noqa: BLE001 - a class that refuses the published config decides nothing here
        return False


def rank_errors(loadcheck_dir: Path) -> list[str]:
    """Each failed rank's error (the full text the rank wrote, longer than the failure signature)."""
    out = []
    for path in sorted(loadcheck_dir.glob("rank*.json")):
        try:
            error = json.loads(path.read_text()).get("error")
        except (OSError, json.JSONDecodeError):
            continue
        if error:
            out.append(error)
    return out


def published_fields(model_type: str) -> dict[str, tuple[object, str]]:
    """field -> (value, hub repo) over the family's published configs in the corpus."""
    from servematrix.sweep import corpus

    out: dict[str, tuple[object, str]] = {}
    for entry in corpus.entries():
        if entry.model_type == model_type:
            for key, value in entry.config().items():
                out.setdefault(key, (value, entry.hub))
    return out


def renamed_on_load(model_type: str, name: str) -> str | None:
    """The transformers rename rule that applies to checkpoint tensor `name` on load, if any."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # noqa: BLE001 - an older transformers without the mapping renames nothing here
        return None
    for rule in rules:
        for source, target in zip(getattr(rule, "source_patterns", []) or [], getattr(rule, "target_patterns", []) or []):
            if isinstance(source, str) and re.search(source, name):
                return f"{source} -> {target}"
    return None


def missing(model_type: str, twin_config: dict, misses: list[str], failure: Failure | None,
            errors: list[str] = (), read_with: str | None = None) -> list[str]:
    """What the twin lacks that vLLM read (each a line naming the field or tensor), or []. `read_with`:
    the config class vLLM read config.json with; where it is transformers' own and that class drops
    the field from the published config too (Llama 3.1's rope_scaling, folded into rope_parameters),
    the real checkpoint misses it the same way: not the twin's."""
    fields = list(misses)
    text = "\n".join([failure.signature if failure is not None else "", *errors])
    for pattern in (_ATTRIBUTE, _NOT_EXIST):
        fields += pattern.findall(text)
    published = published_fields(model_type)
    out = []
    for field in dict.fromkeys(fields):
        if field in published and field not in twin_config:
            if (read_with or "").startswith("transformers.") and _published_object_lacks(model_type, field):
                continue
            value, hub = published[field]
            out.append(f"config field {field} (published {hub}: {json.dumps(value)[:60]})")
    names = [n for m in _NOT_INITIALIZED.finditer(text) for n in m.group(1).split(",")]
    for raw in dict.fromkeys(names):
        name = raw.strip().strip("'\"")
        rule = renamed_on_load(model_type, name)
        if name and rule:
            out.append(f"tensor {name} (transformers renames it on load, {rule}: the twin, saved by transformers, "
                       "holds it under the other name)")
    return out
