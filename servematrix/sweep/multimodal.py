"""Multimodal architectures (vLLM's multimodal registry table) as sweep cells.

Which composites can be forged is data (servematrix/data/sweep-multimodal.yaml, typed by
mirror/composite.py's Composite): per model_type, the composite's class, its text model's config key
and name prefix, its towers, its connector's tensors. A registered multimodal architecture that is
the class of a described model_type is forgeable; its cells are keyed by that model_type (as a text
architecture's are: `llava/tp2-none`). Every other multimodal architecture is not checkable, with
one line: transformers has no class of its name, or its composite is not described yet.

The twin is built from the family's published config (data/configs) by the mirror's
plan_composite and build_twin, like every other twin. `loaded` then tells from the load check's
per-rank digests which of the twin's tensors vLLM's parameters hold bit for bit, and which none
holds (a tower layer past the one vLLM's feature layer needs is in the checkpoint and unread by
design; anything else unread is worth a look).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from servematrix.config import packaged
from servematrix.mirror.composite import Composite
from servematrix.paths import data_file

FILE = data_file("sweep-multimodal.yaml")  # package data, so a wheel install carries it

# the note's words for parameters vLLM built and did not fill (runner: such a cell is no pass)
UNREAD = "parameters holding no tensor of the twin (never read from the checkpoint)"

# a composite twin is not served: serving it needs a processor (image processor, <image> token) the twin lacks
NOT_SERVED = "a multimodal twin: no image processor or image token is forged, so the sweep's serve step is not run"


class MultimodalRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    composites: dict[str, Composite]  # model_type -> its parts

    @field_validator("composites")
    @classmethod
    def _types(cls, composites: dict[str, Composite]) -> dict[str, Composite]:
        for model_type in composites:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", model_type):
                raise ValueError(f"{model_type!r} is not a model_type")
        return composites


def rules() -> MultimodalRules:
    return packaged.load(FILE, MultimodalRules)


def is_composite(key: str) -> bool:
    """Whether a cell key is a model_type the data describes as a composite."""
    return key in rules().composites


def match(arch: str) -> tuple[str | None, str | None]:
    """(model_type, None) for the class of a described composite this transformers has, else
    (model_type or None, the one-line reason it is not checkable here)."""
    import transformers

    from servematrix.sweep.registry import transformers_classes

    by_class, _causal, configs, version = transformers_classes()
    types = [t for t in by_class.get(arch, []) if t in configs]
    cls = getattr(transformers, arch, None) if types else None
    if cls is None:
        return None, (f"multimodal: transformers {version} has no class {arch} (remote code only, or a name only "
                      "vLLM uses), so no tower or connector class to write it")
    own = getattr(getattr(cls, "config_class", None), "model_type", None)
    described = {mt: c for mt, c in rules().composites.items() if c.architecture == arch}
    if own in described:
        return own, None
    return own, (f"multimodal: needs its image/audio tower and connector forged; data/sweep-multimodal.yaml does not "
                 f"describe {own or arch}'s composite yet (described: {', '.join(sorted(rules().composites))})")


def build(model_type: str, directory: Path, max_pp: int, tps: list[int]):
    """The composite's twin (sweep/twins.Twin) from its published config, or the reason there is none."""
    import hashlib

    from servematrix import mirror
    from servematrix.errors import UserError
    from servematrix.mirror.cli import scenario_dict
    from servematrix.mirror.source import ORIGIN_FILE
    from servematrix.paths import code_digest
    from servematrix.sweep import corpus
    from servematrix.sweep.twins import Twin, _line

    parts = rules().composites[model_type]
    real = corpus.published(model_type)
    if real is None:
        return Twin(model_type=model_type, origin="no twin",
                    reason=f"no published {model_type} config in data/configs to forge the composite from")
    origin = (f"composite twin from the {real.label}: text model, towers and connector as data/sweep-multimodal.yaml "
              f"describes them (names from {parts.names_from.split(' (')[0]})")
    name = f"sweep-{model_type.replace('_', '-')}"
    try:
        config = real.config()
        plan = mirror.plan_composite(config, parts, max_pp, tps, source=f"config:{real.hub}",
                                     where=data_file("configs") / real.file)
        if not plan.ok:
            broken = "; ".join(f"{i.name} ({i.detail})" for i in plan.invariants if not i.holds)
            return Twin(model_type=model_type, origin=origin,
                        reason=f"mirror: the twin would break its invariants: {broken}"[:500])
        from servematrix.checkpoint.forge import checkpoint_dir

        h = hashlib.sha256(checkpoint_dir(name, plan.spec).name.encode())
        h.update(code_digest(("mirror/twin.py", "mirror/composite.py"), ()).encode())
        target = directory / f"{model_type}-{h.hexdigest()[:12]}"
        if (target / ORIGIN_FILE).is_file():
            (target / ORIGIN_FILE).touch()  # reused: the test cache prunes twins by this file's age
        else:
            mirror.build_twin(plan, name, target)
        scenario = scenario_dict(plan, name, mirror.composite.text_layout(config, parts, f"config:{real.hub}"))
    except UserError as exc:
        return Twin(model_type=model_type, origin=origin, reason=f"mirror: {_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - a composite the mirror cannot handle costs its cells, not the sweep
        return Twin(model_type=model_type, origin=origin, reason=f"mirror: {type(exc).__name__}: {_line(exc)}")
    (quant,) = scenario["quants"].values()
    dims = ", ".join(f"{k} {a}->{b}" for k, (a, b) in plan.dims.items()
                     if "." in k and k.split(".")[0] != parts.text.config_key)
    return Twin(model_type=model_type, path=str(target), server_args=[*scenario["server"]["args"], *quant["args"]],
                load_only=NOT_SERVED, origin=f"{origin}; towers shrunk: {dims}",
                spec=plan.spec.model_dump(mode="json"), shapes={n: tuple(t.shape) for n, t in plan.forged.items()})


class Held(BaseModel):
    """One of the twin's tensors and whether a rank's parameter holds its values."""

    name: str
    param: str | None = None
    loaded: bool = False


def loaded(twin: Path, check_dir: Path) -> list[Held]:
    """Every distinctive tensor of the twin against the digests the load check's ranks recorded: a
    parameter of the same name (vLLM's own names are the checkpoint's for a composite: language_model.,
    vision_tower., multi_modal_projector.) first, else any parameter (vLLM fuses q/k/v and gate/up into
    one parameter, which then holds none of them whole: such tensors are reported as not found)."""
    from safetensors import safe_open

    from servematrix.sweep import digests

    held = digests.recorded(check_dir)
    by_digest = {d: n for n, d in held.items()}
    out = []
    for path in sorted(Path(twin).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not digests.distinctive(t):
                    continue
                want = digests.of(t)
                hit = name if held.get(name) in want else next((by_digest[w] for w in want if w in by_digest), None)
                out.append(Held(name=name, param=hit, loaded=hit is not None))
    return out


# vLLM's stacked parameters: each holds several checkpoint tensors, none of them whole
FUSED = (".qkv_proj.", ".gate_up_proj.")


def unread_params(twin: Path, check_dir: Path) -> list[str]:
    """vLLM's parameters (outside its fused ones) whose values are no tensor of the twin in any of
    digests.DTYPES: built but never filled from the checkpoint (at TP=1 and PP, where each is whole).
    vLLM 0.32.0's own "not initialized from checkpoint" check exempts every module whose quant method
    has process_weights_after_loading (an unquantized linear's does), so a linear tensor missing from a
    checkpoint passes its load unseen; this finds it."""
    from safetensors import safe_open

    from servematrix.sweep import digests

    in_twin = set()
    for path in sorted(Path(twin).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                in_twin.update(digests.of(f.get_tensor(name)))
    return sorted(n for n, d in digests.recorded(check_dir).items()
                  if d not in in_twin and not any(f in f".{n}" for f in FUSED))


def note(twin: Path, check_dir: Path, tp: int, unfilled: list[str]) -> str | None:
    """A composite cell's load in words: at TP=1 (whole tensors), how many of the twin's distinctive
    tensors vLLM's parameters hold bit for bit per part (text model, each tower, connector), and which
    are not held, in families of names (fused q/k/v and gate/up are vLLM's own stacking, not a miss);
    `unfilled` is unread_params' finding, which the caller judges (sweep/runner.py)."""
    from servematrix.sweep import digests

    ranks = digests.ranks(check_dir)
    if not ranks:
        return None
    params = sum(r.get("parameters") or 0 for r in ranks)
    words = f"composite: vLLM built {ranks[0].get('model')} ({params} parameters over {len(ranks)} rank(s))"
    if tp > 1:
        return words
    found = loaded(twin, check_dir)
    missing = [t.name for t in found if not t.loaded]
    fused = [n for n in missing if re.search(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.", n)]
    unread = [n for n in missing if n not in fused]
    modules: dict[str, int] = {}
    for n in unread:  # by module: a layer (its index kept: which layer matters), else the tensor's parent
        m = re.match(r"^(.*?\.layers\.\d+)\.", n)
        key = m.group(1) if m else n.rpartition(".")[0]
        modules[key] = modules.get(key, 0) + 1
    families = [f"{k} ({v})" for k, v in sorted(modules.items())]
    return (f"{words}; {len(found) - len(missing)} of the twin's {len(found)} distinctive tensors held bit for bit"
            + (f"; {len(fused)} q/k/v, gate/up tensors in vLLM's fused parameters (not comparable whole)" if fused else "")
            + (f"; held by no parameter: {', '.join(families)}" if families else "")
            + (f"; {UNREAD}: {', '.join(unfilled)}" if unfilled else f"; every parameter outside the fused ones holds "
               "a tensor of the twin"))
