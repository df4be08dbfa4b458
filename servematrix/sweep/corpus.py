"""The corpus of published config.json files (servematrix/data/configs/, listed with their sources
in index.yaml): the sweep builds a family's twin from its published config when the corpus has one,
so the twin carries every field the family's checkpoints carry (transformers' configuration classes
drop or never had some that vLLM reads: afmoe score_func, glm4_moe head_dim, deepseek_v4
num_hash_layers, ...), and falls back to the class's defaults only where no published config is known.

A config.json alone has no tensor headers: the source layout is the one transformers' class writes
for that config, built on the meta device, exactly as a `model_type:` source is built from the
class's defaults: the mirror's config-only path (mirror.source.config_layout, the CLI's config.json
source), which this module calls (`layout`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from servematrix.config import packaged
from servematrix.errors import ConfigError
from servematrix.paths import data_file

INDEX = "configs/index.yaml"


class PublishedConfig(BaseModel):
    """One index.yaml entry: a published config.json and where the copy was found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str  # under servematrix/data/configs/
    model_type: str
    hub: str  # the Hugging Face repo (and revision where known) that publishes it
    found: str  # where this copy was read
    complete: bool  # False: a subset of the published fields, verbatim
    note: str | None = None

    @property
    def label(self) -> str:
        return f"published config {self.hub} ({'complete' if self.complete else 'partial copy'})"

    def config(self) -> dict[str, Any]:
        path = data_file("configs") / self.file
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(path, None, None, f"not a readable JSON config: {exc}") from None
        if data.get("model_type") != self.model_type:
            raise ConfigError(path, None, "model_type", f"{data.get('model_type')!r}, the index says {self.model_type!r}")
        return data


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    configs: list[PublishedConfig]


@lru_cache(maxsize=1)
def entries() -> tuple[PublishedConfig, ...]:
    path = data_file(INDEX)
    return tuple(packaged.load(path, _Index).configs)


def published(model_type: str) -> PublishedConfig | None:
    """The first published config listed for `model_type` (the index lists the flagship first)."""
    return next((e for e in entries() if e.model_type == model_type), None)


def layout(entry: PublishedConfig | None, config: dict[str, Any] | None = None):
    """The SourceLayout of `entry`'s checkpoint, unquantized (the mirror's config-only path,
    mirror.source.config_layout: a config alone has no quantized tensors, so its
    `quantization_config` is dropped). A published checkpoint ships a chat template (its
    tokenizer files are not in the corpus): the twin gets the forge's, as a model_type twin does.
    `config`: the config to read instead of the entry's own (a pooling twin's: the entry's, or the
    class's defaults where `entry` is None, with the pooling class as its architecture)."""
    from servematrix.mirror.layout import TokenizerInfo
    from servematrix.mirror.source import config_layout

    config = entry.config() if config is None else config
    source = f"config:{entry.hub}" if entry else f"model_type:{config.get('model_type')}"
    return config_layout(config, source, where=data_file("configs") / entry.file if entry else source,
                         tokenizer=TokenizerInfo(chat_template=True), drop=("quantization_config",))


def checkpoint_names(model_type: str, directory: Path) -> list[str]:
    """Rename the twin's tensors in `directory` (as transformers saved them) to the released
    checkpoint's names where the family's `checkpoint_names` rules (mirror-families.yaml) say
    transformers saves them otherwise; the note saying so (none where no rule applies). The shapes
    stay the class's: only the names differ between the class's save and the real checkpoint."""
    from safetensors.torch import load_file, save_file

    rules_, leaves = _tensor_rules(model_type)
    renames = [r for r in rules_ if "name" in r]
    drops = [r for r in rules_ if "drop_from" in r]
    if not rules_ and not leaves:
        return []
    twin_config = json.loads((Path(directory) / "config.json").read_text()) if drops else {}
    changed, added, dropped = 0, [], 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors = load_file(path)
        out = {}
        for name, tensor in tensors.items():
            if _dropped(_as_weight(name)[0], drops, twin_config):
                dropped += 1
                continue
            new = _renamed(name, renames)
            changed += new != name
            out[new] = tensor
        added += _every_layer(out, leaves)
        save_file(out, path, metadata={"format": "pt"})
    index = Path(directory) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_renamed(n, renames): f for n, f in data.get("weight_map", {}).items()
                              if not _dropped(_as_weight(n)[0], drops, twin_config)}
        index.write_text(json.dumps(data, indent=2))
    notes = [f"{changed} tensors renamed to the released checkpoint's names (mirror-families.yaml "
             "checkpoint_names: transformers renames them on load and cannot restore them on save)"] if changed else []
    if added:
        notes.append(f"added {', '.join(added)} (mirror-families.yaml every_layer: the released checkpoint has it on "
                     "every layer, transformers' class only on some)")
    if dropped:
        notes.append(f"{dropped} tensors transformers' class writes and the released checkpoint does not hold left out "
                     "(mirror-families.yaml checkpoint_names drop_from)")
    return notes


def _dropped(name: str, drops: list[dict], config: dict) -> bool:
    """Whether a drop rule takes `name`: its pattern's first group, a number, is at least the twin's
    config field `drop_from` (LongCat-Flash: experts numbered from n_routed_experts up are its
    identity "zero experts", which hold no weights in the released checkpoint)."""
    import re

    for rule in drops:
        m = re.search(rule["pattern"], name)
        if m and isinstance(config.get(rule["drop_from"]), int) and int(m.group(1)) >= config[rule["drop_from"]]:
            return True
    return False


def _every_layer(tensors: dict, leaves: list[str]) -> list[str]:
    """Add each leaf to the decoder layers of `tensors` (one shard's) that lack it, like an existing one."""
    import re

    import torch

    added = []
    for leaf in leaves:
        pattern = re.compile(r"^(.*?\.layers\.)(\d+)\." + re.escape(leaf) + "$")
        have = {m.group(2): (m.group(1), t) for n, t in tensors.items() if (m := pattern.match(n))}
        if not have:
            continue
        stem, like = next(iter(have.values()))
        layers = {m.group(1) for n in tensors if (m := re.match(re.escape(stem) + r"(\d+)\.", n))}
        for layer in sorted(layers - set(have), key=int):
            name = f"{stem}{layer}.{leaf}"
            tensors[name] = torch.ones_like(like)
            added.append(name)
    return added


def _tensor_rules(model_type: str) -> tuple[list[dict], list[str]]:
    """The family's `checkpoint_names` rules and `every_layer` leaves (mirror-families.yaml)."""
    from servematrix.mirror.layout import rules

    return ((rules().get("checkpoint_names") or {}).get(model_type) or [],
            (rules().get("every_layer") or {}).get(model_type) or [])


def rewrites_tensors(model_type: str) -> bool:
    """Whether checkpoint_names changes anything for the family's twins."""
    return any(_tensor_rules(model_type))


def _renamed(name: str, renames: list[dict]) -> str:
    """`name` under the rename rules; a quantized leaf (`_as_weight`) is renamed as its linear's
    `weight` is, and keeps its own leaf."""
    import re

    base, leaf = _as_weight(name)
    for rule in renames:
        base = re.sub(rule["pattern"], rule["name"], base)
    if leaf is None:
        return base
    return f"{base.removesuffix('.weight')}.{leaf}" if base.endswith(".weight") else name


# the tensors a quantized twin's linear holds in place of its `weight` (sweep/quant.py's layouts: GPTQ/AWQ
# qweight, qzeros, scales, g_idx; FP8 weight_scale_inv, weight_scale, input_scale); the weight itself stays
# `weight` under FP8
_QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale_inv", "weight_scale", "input_scale")


def _as_weight(name: str) -> tuple[str, str | None]:
    """A quantized twin's tensor named as the float twin's (its linear's `weight`) and its own leaf, so the
    checkpoint_names rules, written against the float class's save, take the quantized twin's tensors too
    (LongCat-Flash: the zero experts' `gate_proj.weight_scale_inv` go with their `gate_proj.weight`);
    (name, None) for any other tensor."""
    stem, _, leaf = name.rpartition(".")
    return (f"{stem}.weight", leaf) if stem and leaf in _QUANT_LEAVES else (name, None)


def unmirrorable(model_type: str) -> str | None:
    """Why no twin of `model_type` can stand for a released checkpoint (mirror-families.yaml), or None."""
    from servematrix.mirror.layout import rules

    return (rules().get("unmirrorable") or {}).get(model_type)


def checkpoint_config(model_type: str, directory: Path, source_config: dict, source_layers: int) -> list[str]:
    """Rewrite the twin's config.json in `directory` with the fields the released checkpoint spells
    its own way (mirror-families.yaml checkpoint_config), from the twin's own fields, and without the
    class's folded ones; the note saying what changed (none where the family has no rule)."""
    from servematrix.errors import ConfigError
    from servematrix.mirror.layout import rules

    rule = (rules().get("checkpoint_config") or {}).get(model_type)
    if not rule:
        return []
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    written = {}
    for key, how in (rule.get("set") or {}).items():
        if "count" in how:
            written[key] = sum(1 for v in config.get(how["count"]) or [] if v == how["equals"])
        elif "from" in how:
            base = config.get(how["from"])
            if not isinstance(base, list) or any(v not in how["map"] for v in base):
                raise ConfigError("mirror-families.yaml", None, f"checkpoint_config.{model_type}.{key}",
                                  f"maps every entry of the twin's list {how['from']!r} (got {base!r:.80})")
            tail = source_config.get(how.get("tail") or "") or []
            written[key] = [how["map"][v] for v in base] + list(tail[source_layers:])
    dropped = [k for k in rule.get("drop") or [] if k in config]
    config = {k: v for k, v in config.items() if k not in dropped}
    config.update(written)
    path.write_text(json.dumps(config, indent=2))
    return [f"config.json in the released checkpoint's spelling (mirror-families.yaml checkpoint_config): "
            f"{json.dumps(written)[:200]}, without {dropped}"]
