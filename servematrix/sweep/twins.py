"""One mirrored twin per swept model_type, from the family's published config.json where the corpus
has one (sweep/corpus.py, data/configs/), else from its transformers configuration defaults (every
twin says which: Twin.origin, in each cell's note), planned for every layout of the sweep at once
(layers >= the largest PP; KV heads that every TP either divides or is a multiple of: the mirror's
own invariants), built by the mirror's public functions.

A pooling architecture's twin (sweep/pooling.py) is built the same way, one per architecture (its
cells' key is its name): transformers' class of that name, from the same published config or
defaults with `architectures` set to it, so the twin holds the head (classifier, score) vLLM loads.

A twin the mirror cannot plan or build makes that architecture's cells "not checkable here" with
the mirror's one-line reason: it is servematrix that cannot forge it, not vLLM that failed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from servematrix.errors import UserError

# what the rewrite into the released checkpoint's spellings changed, kept in the twin it rewrote
REWRITES_FILE = "sweep-checkpoint.json"


class Twin(BaseModel):
    model_type: str
    architecture: str | None = None  # a pooling twin's class (its cells' key); None: the model_type's causal LM
    path: str | None = None  # the checkpoint directory, when built
    server_args: list[str] = []  # the mirror's scenario server args and its one quant's args
    reason: str | None = None  # why there is no twin
    quant: str = "none"
    note: str = ""  # a quantized twin's layout in words
    load_only: str | None = None  # why its scenario says load check only on CPU (the mirror's MLA rule)
    spec: dict | None = None  # the ForgeSpec it was forged from (dumped), for its quantized variants
    shapes: dict[str, tuple[int, ...]] = {}  # what that spec forged: tensor name -> shape
    origin: str = ""  # what the twin was built from: a published config (with its source) or transformers' defaults
    draft: str | None = None  # a speculative draft's twin (sweep/drafts.py): its --speculative-config method
    # model_types the load check reads as a plain PretrainedConfig (a native twin's: sweep/native.py)
    config_types: list[str] = []
    # the twin this one was built beside (a draft's target, a headed twin's base): its quantized cells quantize that
    target: Twin | None = None

    @property
    def ok(self) -> bool:
        return self.path is not None


def build(key: str, directory: Path, max_pp: int, tps: list[int], align: dict[str, int] | None = None) -> Twin:
    """The twin of a cell key in `directory`, or the reason there is none: a model_type's (its
    causal-LM class), or a pooling architecture's (key: the class's name, never a model_type).
    `align`: widths whole multiples of these units per TP rank (mirror/dims.py), for a quantized
    layout the smallest twin cannot hold."""
    from servematrix import mirror
    from servematrix.mirror.cli import scenario_dict

    from servematrix.sweep import corpus, drafts, heads, multimodal, native, pooling, wrappers

    if heads.describes(key):  # its family's twin with the head added (data/sweep-heads.yaml)
        return heads.build(key, directory, max_pp, tps, align)
    if native.is_native(key):  # no transformers class: vLLM's own class gives the layout (data/sweep-native.yaml)
        return native.build(key, directory, max_pp, tps, align)
    if wrappers.is_wrapper(key):  # an architecture's twin that uses it, with --model-impl transformers
        return wrappers.build(key, directory, max_pp, tps, align)
    if drafts.is_draft(key):  # its target's twin with the draft layers added
        return drafts.build(key, directory, max_pp, tps, align)
    if multimodal.is_composite(key):  # text model, towers and connector (data/sweep-multimodal.yaml)
        if align:
            return Twin(model_type=key, origin="no twin", reason="a composite twin is not widened for quantized layouts yet")
        return multimodal.build(key, directory, max_pp, tps)
    arch = key if key[:1].isupper() else None  # model_types are lower case, class names CamelCase
    model_type = pooling.model_type_of(key) if arch else key
    if model_type is None:
        return Twin(model_type=key, architecture=arch, origin="no twin",
                    reason=f"transformers has no class {key} to forge")
    name = f"sweep-{(arch or model_type).replace('_', '-').lower()}"
    why = corpus.unmirrorable(model_type)
    if why:
        return Twin(model_type=model_type, architecture=arch, reason=f"mirror-families.yaml unmirrorable: {why}",
                    origin="no twin")
    real = corpus.published(model_type)
    origin = (f"twin from the {real.label}" if real else
              "twin from transformers' configuration defaults (no published config in data/configs)")
    if arch:
        origin += f", as transformers' {arch}"
    try:
        if arch:
            layout = corpus.layout(real, pooling.source_config(model_type, arch, real.config() if real else None))
        elif real is not None:
            # an unquantized twin: the published quantization_config names tensors a config alone does not give
            layout = corpus.layout(real)
        else:
            layout = mirror.read_source(f"model_type:{model_type}")
        plan = mirror.plan_twin(layout, max_pp, tps, align=align)
        if not plan.ok:
            broken = "; ".join(f"{i.name} ({i.detail})" for i in plan.invariants if not i.holds)
            return Twin(model_type=model_type, architecture=arch, origin=origin,
                        reason=f"mirror: the twin would break its invariants: {broken}"[:500])
        scenario = scenario_dict(plan, name, layout)
        path = _built(plan, name, directory, arch or model_type, _released_spelling(model_type, layout))
        origin = "; ".join([origin, *json.loads((path / REWRITES_FILE).read_text())])
    except UserError as exc:
        return Twin(model_type=model_type, architecture=arch, origin=origin, reason=f"mirror: {_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - a class the mirror cannot handle costs its cells, not the sweep
        return Twin(model_type=model_type, architecture=arch, origin=origin,
                    reason=f"mirror: {type(exc).__name__}: {_line(exc)}")
    (quant,) = scenario["quants"].values()
    # a pooling twin's cells are served or not by their registry table (runner: pooling.unserved)
    load_only = (scenario.get("load_check") or {}).get("reason")
    return Twin(model_type=model_type, architecture=arch, path=str(path),
                server_args=[*scenario["server"]["args"], *quant["args"], *(pooling.SERVER_ARGS if arch else [])],
                load_only=load_only, origin=origin,
                spec=plan.spec.model_dump(mode="json"), shapes={n: tuple(t.shape) for n, t in plan.forged.items()})


def _released_spelling(model_type: str, layout):
    """The rewrite of a built twin into the released checkpoint's spellings (sweep/corpus.py:
    tensor names transformers saves otherwise, config fields the class folds), its notes kept in
    the twin (REWRITES_FILE): run once, before the twin is in place, as it is not idempotent (a
    config field it maps is gone after it)."""
    from servematrix.sweep import corpus

    def finish(path: Path) -> None:
        notes = [*corpus.checkpoint_names(model_type, path),
                 *corpus.checkpoint_config(model_type, path, layout.config, layout.structure.num_layers)]
        (path / REWRITES_FILE).write_text(json.dumps(notes))

    return finish


def _built(plan, name: str, directory: Path, key: str, finish) -> Path:
    """The twin's directory, named by what decides its bytes (the forge's content-addressed entry,
    which carries the spec and the forge's code, and the mirror's post-processing): a sweep of
    other layouts, or a second sweep at the same time, never rewrites a twin another is loading
    (was: one directory per model_type, replaced by whichever sweep came last). build_twin renames
    a finished directory, `finish` already applied, into place, so one that exists is complete and
    is reused as it is (its mirror.json touched: the test cache prunes twins by it)."""
    import hashlib

    from servematrix import mirror
    from servematrix.checkpoint.forge import checkpoint_dir
    from servematrix.mirror.source import ORIGIN_FILE
    from servematrix.paths import code_digest

    h = hashlib.sha256(checkpoint_dir(name, plan.spec).name.encode())
    h.update(json.dumps([s.detail for s in plan.post]).encode())
    # the rewrite's code and rules too: a twin in place is reused as it is, never rewritten again
    h.update(code_digest(("mirror/twin.py", "sweep/corpus.py", "data/mirror-families.yaml"), ()).encode())
    target = directory / f"{key}-{h.hexdigest()[:12]}"
    origin = target / ORIGIN_FILE
    if origin.is_file():
        origin.touch()
        return target
    return mirror.build_twin(plan, name, target, finish)


def quantize(base: Twin, quant: str, tps: list[int], wide=None) -> Twin:
    """`base` re-forged under `quant` (sweep/quant.py, data/sweep-quants.yaml), or the reason it cannot be.
    A mirror twin is exactly forge(plan.spec) (the mirror's post-processing steps are for sources
    with layouts the forge cannot write; a model_type source has none), so the quantized twin is
    forge(its spec plus the quantized option), in the forge's cache. Where `base` is narrower than
    every block or group of `quant`, `wide(units)` gives the same twin re-planned that wide (as real
    checkpoints are), and that one is quantized instead."""
    from servematrix.checkpoint.forge import forge
    from servematrix.sweep import native
    from servematrix.sweep.quant import layout, quantized, widen_units

    name = f"sweep-{(base.architecture or base.model_type).replace('_', '-').lower()}-{quant}"
    # a native twin (sweep/native.py) has no ForgeSpec: the layout is applied to its own tensors
    own = base.ok and base.spec is None and native.is_native(base.architecture or "")

    def plan(twin: Twin):
        if own:
            config = json.loads((Path(twin.path) / "config.json").read_text())
            return layout(twin.model_type, config, twin.shapes, quant, tps)
        return quantized(twin.model_type, twin.spec, twin.shapes, quant, tps)

    if base.ok and base.target is not None and _made_again(base):  # built beside another twin: that one quantized
        def wide_target(units: dict[str, int]) -> Twin:  # the widened twin's own target (or why there is none)
            wider = wide(units)
            return wider.target if wider.target is not None else wider

        return beside(base, quantize(base.target, quant, tps, wide_target if wide else None))
    if not base.ok or (base.spec is None and not own):
        return base.model_copy(update={"quant": quant, "path": None, "reason": base.reason or (
            "a draft held in its target's checkpoint is unquantized only here (real quantized checkpoints quantize "
            "its layers with the target's, e.g. DeepSeek-V3's FP8 MTP layer; that layout is not forged yet)"
            if base.draft else "no forge spec recorded for the twin")})
    if base.spec and base.spec.get("components"):  # a composite (sweep/multimodal.py): its towers have no quantized layout here
        return base.model_copy(update={"quant": quant, "path": None, "reason": "a multimodal composite's cells are "
                                       "unquantized only (no quantized layout of its towers and connector is forged yet)"})
    q = plan(base)
    widen = widen_units(quant, base.shapes) if q.narrow and wide is not None else None
    if isinstance(widen, str):
        return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, origin=base.origin,
                    reason=f"{q.reason}; {widen}")
    if widen is not None:
        wider = wide(widen[0])
        if not wider.ok:
            return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, origin=base.origin,
                        reason=f"{q.reason}; {widen[1]}: {wider.reason}")
        base, q = wider, plan(wider)
        q = q.model_copy(update={"note": f"{q.note} ({widen[1]})"}) if q.spec is not None else q
    if q.spec is None:
        return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, reason=q.reason,
                    origin=base.origin)
    if own:
        made = native.quantized(base, q.spec, quant)
        if isinstance(made, str):
            return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, reason=made,
                        origin=base.origin)
        return base.model_copy(update={"quant": quant, "path": str(made), "note": q.note, "shapes": {},
                                       "server_args": _dtype(base.server_args, q.spec.get("dtype") or "bfloat16")})
    from servematrix.config.forge_spec import ForgeSpec

    try:
        path = forge(name, ForgeSpec.model_validate(q.spec))
    except (ValueError, KeyError, RuntimeError, UserError) as exc:
        return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, origin=base.origin,
                    reason=f"forge ({quant}): {type(exc).__name__}: {_line(exc)}")
    path = _released_tensors(base.model_type, Path(path), Path(base.path).parent)
    return Twin(model_type=base.model_type, architecture=base.architecture, quant=quant, path=str(path), note=q.note,
                load_only=base.load_only,
                origin=base.origin,
                server_args=_dtype(base.server_args, "bfloat16" if q.spec["dtype"] == "float32" else q.spec["dtype"]))


def _made_again(twin: Twin) -> bool:
    """Whether `twin`'s quantized cells are it made again beside its target quantized: a draft of its own
    checkpoint (unquantized, as deployed), a headed pooling twin (the head in float)."""
    from servematrix.sweep import drafts, heads

    return bool(twin.draft and drafts.own_checkpoint(twin.architecture)) or heads.describes(twin.architecture or "")


def beside(twin: Twin, target: Twin) -> Twin:
    """`twin` made again beside `target`, the twin it was built beside quantized (sweep/drafts.py
    with_draft: the draft unquantized, as such drafts are published and deployed, an EAGLE-3 speculator
    in BF16 for an FP8 target; sweep/heads.py with_head: the head in float); or the reason there is none."""
    from servematrix.sweep import drafts, heads

    key = twin.architecture
    if twin.draft:
        role, name, what, make = "target", drafts.rules().drafts[key].target, "draft", drafts.with_draft
        note = "the draft unquantized beside it, as published drafts for quantized targets are"
    else:
        role, name, what, make, note = "base", heads.rules().heads[key].base, "head", heads.with_head, "the head in float"
    if not target.ok:
        return twin.model_copy(update={"quant": target.quant, "path": None, "note": "", "target": None,
                                       "reason": f"its {role} {name}: {target.reason}"})
    made = make(key, target, Path(twin.path).parent, f"-{target.quant}")
    if isinstance(made, str):
        return twin.model_copy(update={"quant": target.quant, "path": None, "target": None,
                                       "reason": f"{what} beside its {target.quant} {role}: {made}"})
    return made.model_copy(update={"origin": twin.origin, "note": f"{target.note}; {note}"})


def _released_tensors(model_type: str, forged: Path, directory: Path) -> Path:
    """The quantized twin `forged` (the forge's output: transformers' class's tensor names) with the
    tensor rewrite its float twin got in `_released_spelling` (sweep/corpus.py checkpoint_names: the
    released checkpoint's names, tensors the class writes and the release does not hold left out),
    as a copy in `directory` named by the forged directory and the rewrite's code and rules; `forged`
    itself where the family has no such rule. Without it a quantized twin held what no released
    checkpoint holds (LongCat-Flash: its 256 identity zero experts' gate/up projections, which
    vLLM's longcat_flash.py has no parameter for: KeyError 'layers.0.mlp.experts.10.gate_proj.weight',
    while the float twin, rewritten, loads). The config rewrite (checkpoint_config) is not applied:
    it needs the source layout, which a quantized twin's spec does not carry."""
    import hashlib
    import shutil

    from servematrix.paths import build_cached, code_digest
    from servematrix.sweep import corpus

    if not corpus.rewrites_tensors(model_type):
        return forged
    h = hashlib.sha256(forged.name.encode())
    h.update(code_digest(("sweep/corpus.py", "data/mirror-families.yaml"), ()).encode())

    def rewrite(tmp: Path) -> list[str]:
        shutil.copytree(forged, tmp, dirs_exist_ok=True)
        return corpus.checkpoint_names(model_type, tmp)

    return build_cached(directory / f"{forged.name}-released-{h.hexdigest()[:12]}", REWRITES_FILE, rewrite)


def _dtype(args: list[str], dtype: str) -> list[str]:
    """vLLM's FP8 methods take bf16/fp16 activations only (float32 is refused at config time)."""
    out = list(args)
    if "--dtype" in out:
        out[out.index("--dtype") + 1] = dtype
    else:
        out += ["--dtype", dtype]
    return out


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]
