"""`servematrix mirror SOURCE`: a tiny forged twin of any checkpoint, from its metadata only.

The question it answers on a laptop: will vLLM X load THIS checkpoint at TP=t / PP=p, before its
700 GB are downloaded. source.py reads the source (local directory, Hugging Face id, or a
transformers model_type); plan.py shrinks it under stated invariants; here the twin is
written (the forge, then the post-processing steps the forge cannot express), compared with its
source (`diff`), and described as a scenario YAML that `servematrix run` can serve.

API: read_source(source) -> SourceLayout; plan_twin(layout, max_pp, tp_values) -> Plan;
build_twin(plan, name, directory) -> Path; diff(source_layout, twin_layout) -> DiffReport;
scenario_yaml(plan, name, layout) -> str; cli_mirror(...) -> str and cli_diff(source, twin) ->
(str, equal) for the CLI to print.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from servematrix.errors import ArgumentError, StateError, UserError
from servematrix.checkpoint.forge import FP8_MAX, fp8_block_quantize, forge
from servematrix.mirror.layout import MirrorOrigin, SourceLayout, TensorMeta, field_value, layer_signatures, rules
from servematrix.mirror.plan import NotMirrored, Plan, QuantTarget, plan_twin, remap_module
from servematrix.mirror.source import ORIGIN_FILE, read_header, read_local, read_source
from servematrix.mirror.tensors import canonical, canonical_dtypes, compare

__all__ = ["DiffReport", "build_twin", "cli_diff", "cli_mirror", "diff", "infer_layer_map", "plan_twin",
           "post_process", "read_source", "scenario_yaml"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffItem(_Model):
    name: str
    reason: str


class DtypeDiff(_Model):
    name: str
    source: list[str]
    twin: list[str]


class DiffReport(_Model):
    """`mirror --diff SOURCE TWIN`: tensor names compared up to the layer and expert count (each
    source layer read as the twin layer standing for it), dtypes per name, the quantization_config
    with its module lists remapped, and everything the twin does not mirror, with the reason."""

    source: str
    twin: str
    layer_map: dict[int, int]
    names: int  # canonical names compared
    only_in_source: list[DiffItem] = Field(default_factory=list)
    only_in_twin: list[DiffItem] = Field(default_factory=list)
    dtypes: list[DtypeDiff] = Field(default_factory=list)
    quant_config: list[str] = Field(default_factory=list)  # differences, after remapping
    not_mirrored: list[NotMirrored] = Field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_in_source or self.only_in_twin or self.dtypes or self.quant_config)

    def render(self) -> str:
        lines = [f"diff {self.source} -> {self.twin}: {'names, dtypes and quantization_config equal' if self.equal else 'DIFFERENT'} "
                 f"({self.names} names up to layers/experts)"]
        lines += [f"  only in the source: {i.name} ({i.reason})" for i in self.only_in_source]
        lines += [f"  only in the twin: {i.name} ({i.reason})" for i in self.only_in_twin]
        lines += [f"  dtype {d.name}: source {d.source}, twin {d.twin}" for d in self.dtypes]
        lines += [f"  quantization_config {q}" for q in self.quant_config]
        lines += ["  not mirrored:"] + [f"    {n.what}: {n.reason}" for n in self.not_mirrored]
        return "\n".join(lines)


# ---- diff ----

def infer_layer_map(source: SourceLayout, twin: SourceLayout) -> dict[int, int]:
    """Without the twin's mirror.json: each source layer onto a twin layer of the same kind (the
    same index where there is one, else the nearest below, else the first)."""
    s_sig, t_sig = layer_signatures(source.tensors), layer_signatures(twin.tensors)
    out = {}
    for i, sig in sorted(s_sig.items()):
        same = [j for j, t in sorted(t_sig.items()) if t == sig]
        out[i] = i if i in same else max([j for j in same if j < i], default=same[0] if same else min(i, max(t_sig, default=0)))
    return out


def diff(source_layout: SourceLayout, twin_layout: SourceLayout, layer_map: dict[int, int] | None = None) -> DiffReport:
    origin = twin_layout.origin
    lm = layer_map or (origin.layer_map if origin else None) or infer_layer_map(source_layout, twin_layout)
    src = canonical_dtypes(source_layout.tensors, lm)
    twin = canonical_dtypes(twin_layout.tensors)
    only_src, only_twin, dtypes = compare(src, twin)
    reasons = {n["what"]: n["reason"] for n in (origin.not_mirrored if origin else [])}
    return DiffReport(
        source=source_layout.source, twin=twin_layout.source, layer_map=lm, names=len(src),
        only_in_source=[DiffItem(name=c, reason=_reason(c, reasons, "the twin lacks it")) for c in only_src],
        only_in_twin=[DiffItem(name=c, reason=_reason(c, reasons, "the source lacks it")) for c in only_twin],
        dtypes=[DtypeDiff(name=c, source=s, twin=t) for c, s, t in dtypes],
        quant_config=_quant_config_diff(source_layout, twin_layout, lm),
        not_mirrored=[NotMirrored(what=w, reason=r) for w, r in reasons.items()] + _config_diff(source_layout, twin_layout))


def _reason(c: str, reasons: dict[str, str], default: str) -> str:
    # the plan's not-mirrored entries that name a tensor or a module prefix of it
    for what, reason in reasons.items():
        key = canonical(what) if "." in what else None
        if key and (c == key or c.startswith(key + ".")):
            return reason
    return f"unexplained: {default}"


def _quant_config_diff(source: SourceLayout, twin: SourceLayout, lm: dict[int, int]) -> list[str]:
    experts = field_value(twin.config, "experts")[1]
    want = dict(source.quant.config)
    key = source.quant.ignored_key
    if key and isinstance(want.get(key), list):
        want[key] = list(dict.fromkeys(remap_module(m, lm, experts) for m in want[key]))
    got = twin.quant.config
    return [f"{k}: source {want.get(k)!r}, twin {got.get(k)!r}" for k in sorted(set(want) | set(got))
            if want.get(k) != got.get(k)]


def _config_diff(source: SourceLayout, twin: SourceLayout) -> list[NotMirrored]:
    owned = set(rules()["fields"]["forge_owned"])
    out = []
    for k, v in sorted(source.config.items()):
        if k in owned or twin.config.get(k) == v:
            continue
        if k not in twin.config:
            reason = "not in the twin's config.json (transformers' class rewrites it; the twin carries its reading)"
        else:
            reason = f"{_short(v)} -> {_short(twin.config[k])} (shrunk, or subsampled onto the kept layers)"
        out.append(NotMirrored(what=f"config {k}", reason=reason))
    return out


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- building the twin ----

def build_twin(plan: Plan, name: str, directory: Path | str) -> Path:
    """forge(name, plan.spec) into the cache, copied to `directory` and post-processed there (the
    cache entry stays what its spec says), with mirror.json; the written headers must be the plan's
    twin exactly."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not (target / ORIGIN_FILE).is_file():
        raise StateError(target, "exists and is not a twin written by mirror (no mirror.json): not overwritten")
    try:
        forged = forge(name, plan.spec)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(f"forge:{name}", f"forging the twin failed: {type(exc).__name__}: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(forged, tmp, dirs_exist_ok=True)
        written = _headers(tmp)
        if written != plan.forged:
            raise StateError(forged, "the forge wrote another layout than planned: " + _layout_delta(plan.forged, written))
        post_process(tmp, plan)
        written = _headers(tmp)
        if written != plan.twin:
            raise StateError(tmp, "post-processing wrote another layout than planned: " + _layout_delta(plan.twin, written))
        origin = MirrorOrigin(source=plan.source, layer_map=plan.layer_map, experts=plan.experts,
                              not_mirrored=[n.model_dump() for n in plan.not_mirrored],
                              post_processed=[s.detail for s in plan.post])
        (tmp / ORIGIN_FILE).write_text(origin.model_dump_json(indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a server in a container must read it too
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _headers(directory: Path) -> dict[str, TensorMeta]:
    out: dict[str, TensorMeta] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(read_header(path))
    return out


def _layout_delta(want: dict[str, TensorMeta], got: dict[str, TensorMeta]) -> str:
    missing = sorted(set(want) - set(got))[:3]
    extra = sorted(set(got) - set(want))[:3]
    changed = [f"{n}: {want[n].dtype}{list(want[n].shape)} != {got[n].dtype}{list(got[n].shape)}"
               for n in sorted(set(want) & set(got)) if want[n] != got[n]][:3]
    return f"missing {missing}, unexpected {extra}, changed {changed}"


_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, _TORCH[code])


def post_process(directory: Path, plan: Plan) -> None:
    """Rewrite the forged safetensors to the source's names and dtypes where the forge cannot:
    quantized layouts it has no option for (AWQ/GPTQ int32 packs, NVFP4 uint8 + FP8 scales, FP8
    per-tensor, FP8 blocks that end in a partial block), per-tensor dtypes, tensors of non-float
    dtypes, tensors the class writes but the source lacks. All into one model.safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    if not plan.post:
        return
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict = {}
    for path in files:
        tensors.update(load_file(path))
    gen = torch.Generator().manual_seed(plan.spec.seed + 3)
    for target in plan.quant:
        if not target.forge:
            tensors.update(_quantize(target, tensors.pop(target.prefix + ".weight"), gen))
    for step in plan.post:
        for name in step.names:
            if step.op == "cast":
                tensors[name] = tensors[name].to(_torch_dtype(plan.twin[name].dtype))
            elif step.op == "add":
                tensors[name] = _fill(name.rpartition(".")[2], plan.twin[name], gen, {}, None)
            elif step.op == "drop":
                tensors.pop(name, None)
    for path in files:
        path.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})


def _quantize(t: QuantTarget, weight, gen) -> dict:
    """The twin's float weight in the target's layout: FP8 weights really quantized (a partial last
    block padded, as DeepSeek's checkpoints do), packed integer / FP4 tensors random bits, scales
    small and positive, and every dtype the source's."""
    import torch

    out = {}
    leaves = t.leaves
    if leaves.get("weight") and leaves["weight"].dtype == "F8_E4M3":
        scale_leaf = next((leaf for leaf in ("weight_scale_inv", "weight_scale") if leaf in leaves), None)
        q, scale = _fp8(weight.float(), t, scale_leaf)
        out[f"{t.prefix}.weight"] = q
        if scale_leaf:
            out[f"{t.prefix}.{scale_leaf}"] = scale.to(_torch_dtype(leaves[scale_leaf].dtype))
    for leaf, meta in leaves.items():
        name = f"{t.prefix}.{leaf}"
        if name not in out:
            out[name] = _fill(leaf, meta, gen, t.values, t.params)
    for name, value in out.items():
        assert tuple(value.shape) == leaves[name.rpartition(".")[2]].shape, name
    return {k: v.contiguous() for k, v in out.items()}


def _fp8(weight, t: QuantTarget, scale_leaf: str | None):
    import torch

    if scale_leaf == "weight_scale_inv":
        bn, bk = t.params["block_n"], t.params["block_k"]
        n, k = weight.shape
        padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
        padded[:n, :k] = weight
        q, scale = fp8_block_quantize(padded, [bn, bk])
        return q[:n, :k].contiguous(), scale
    shape = t.leaves[scale_leaf].shape if scale_leaf else ()
    per_row = len(shape) >= 1 and shape[0] == t.out and t.out > 1
    amax = weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(shape)


def _fill(leaf: str, meta: TensorMeta, gen, values: dict, params: dict | None):
    import torch

    dtype = _torch_dtype(meta.dtype)
    if leaf in values:
        return torch.tensor(values[leaf], dtype=dtype).reshape(meta.shape)
    if leaf == "g_idx" and params:  # the act-order index: input channel -> its group
        return (torch.arange(meta.shape[0]) // params["group"]).to(dtype)
    if meta.dtype in {"I32", "I64", "I16", "I8", "U8"}:  # packed quantized values: any bits are valid
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, meta.shape, generator=gen, dtype=torch.int64).to(dtype)
    if meta.dtype.startswith("F8") or meta.dtype == "BOOL":
        return torch.ones(meta.shape).to(dtype)
    if len(meta.shape) == 0 or all(d == 1 for d in meta.shape):  # per-tensor scales
        return torch.ones(meta.shape, dtype=dtype)
    return (torch.rand(meta.shape, generator=gen) * 0.01 + 1e-3).to(dtype)  # group scales, plain extras


# ---- the scenario ----

def scenario_dict(plan: Plan, name: str, layout: SourceLayout) -> dict:
    from servematrix.config.scenario import Scenario

    schemes = sorted({t.scheme for t in plan.quant})
    requires = {}
    for s in schemes:
        for k, v in rules()["schemes"][s].get("requires", {}).items():
            requires[k] = max(v, requires.get(k, v))
    # vLLM's quantized methods take bf16/fp16 activations only (float32 is refused at config time)
    serve_dtype = "bfloat16" if layout.quant.method and plan.spec.dtype == "float32" else plan.spec.dtype
    quant_name = "-".join(s.replace("_", "-") for s in schemes) or {"float32": "fp32", "bfloat16": "bf16",
                                                                  "float16": "fp16"}[serve_dtype]
    server_args = (["--trust-remote-code"] if plan.spec.remote_code else []) + [
        "--enforce-eager", "--max-model-len", str(rules()["targets"]["max_model_len"]), "--max-num-seqs", "8"]
    prompts = [{"name": "completion", "prompt": "Question: Natalia sold clips to 48 of her friends in April. How "
                "many clips did she sell?\nAnswer:", "max_tokens": 16, "expect": {"min_tokens": 1}}]
    if plan.spec.tokenizer.chat_template:
        prompts.append({"name": "chat", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16,
                        "expect": {"min_tokens": 1}})
    st = layout.structure
    data = {
        "name": name, "description": describe(plan, layout),
        "tags": ["mirror", "forged", layout.model_type] + (["moe"] if st.moe else []) + (["mla"] if st.mla else [])
                + (["dsa"] if st.dsa else []) + (["kv-scale"] if layout.quant.kv_scales else [])
                + [s.replace("_", "-") for s in schemes],
        "model": {"forge": plan.spec.model_dump(mode="json", exclude_defaults=True)},
        "server": {"args": server_args},
        "quants": {quant_name: {"args": ["--dtype", serve_dtype], **({"requires": requires} if requires else {})}},
        "smoke": {"prompts": prompts, "parity": {"top_k": 5}},
        "gsm8k": {"enabled": False},
    }
    if st.mla:
        data["load_check"] = {"devices": ["cpu"], "reason": rules()["load_check"]["mla"]}
    Scenario.model_validate(data)  # the same shape as scenarios/*.yaml, or nothing is written
    return data


def scenario_yaml(plan: Plan, name: str, layout: SourceLayout) -> str:
    return yaml.safe_dump(scenario_dict(plan, name, layout), sort_keys=False, width=110)


def describe(plan: Plan, layout: SourceLayout) -> str:
    st = layout.structure
    dims = ", ".join(f"{k} {a}->{b}" for k, (a, b) in plan.dims.items()) or "no width changed"
    text = (f"A tiny twin of {layout.source} ({plan.architecture}) written by `servematrix mirror` from its metadata "
            f"only (config, tokenizer files, safetensors headers): the source's tensor names, dtypes and quantization "
            f"layout with random weights. {len(plan.kept_layers)} main layers for PP <= {plan.max_pp} (source layers "
            f"{plan.kept_layers} of {st.num_layers}"
            + (f", plus {len(st.mtp_layer_indices)} MTP" if st.mtp_layer_indices else "") + f"), TP {plan.tp}; {dims}.")
    if plan.post:
        text += (" Post-processed after forging (so `servematrix run` from this file alone forges the twin WITHOUT "
                 "these steps; the mirrored checkpoint directory has them): "
                 + "; ".join(f"{s.op}: {s.detail}" for s in plan.post) + ".")
    return text


# ---- what the CLI prints ----

def render_plan(plan: Plan, layout: SourceLayout) -> list[str]:
    q = layout.quant
    st = layout.structure
    lines = [f"source {layout.source}: {layout.model_type} ({', '.join(layout.architectures)}), "
             f"{len(layout.tensors):,} tensors in {len(layout.files)} files (headers only), "
             f"quant {q.method or 'none'} {q.schemes or ''}{' kv-scales ' + str(q.kv_scales) if q.kv_scales else ''}",
             f"  structure: {st.num_layers} layers, moe={st.moe} experts={st.experts} top_k={st.top_k} "
             f"shared={st.shared_experts} first_dense={st.first_dense} mla={st.mla} dsa={st.dsa} "
             f"mtp={st.mtp_layers} tied={st.tied_embeddings}",
             f"twin: {len(plan.twin):,} tensors, dtype {plan.spec.dtype}, "
             f"{'reproducible from the scenario YAML alone' if plan.reproducible else 'needs post-processing'}",
             "invariants:"]
    lines += [f"  {'ok  ' if i.holds else 'FAIL'} {i.name}: {i.detail}\n         rule: {i.rule}" for i in plan.invariants]
    lines += [f"post-processing: {s.op}: {s.detail}" for s in plan.post]
    lines += [f"note: {n}" for n in plan.notes]
    return lines


def cli_mirror(source: str, out_scenario: str | Path, checkpoint_dir: str | Path | None, max_pp: int,
               tp_values: list[int], name: str, *, kv_policy: str = "cover", overwrite: bool = False) -> str:
    """Read SOURCE's metadata, plan the twin, write its scenario YAML (and with checkpoint_dir the
    checkpoint, then diff it against the source); returns what to print. A plan that breaks an
    invariant writes nothing."""
    import re

    from servematrix.config.scenario import NAME_RE

    out = Path(out_scenario)
    if not re.match(NAME_RE, name):
        raise ArgumentError("--name", f"{name!r} must match {NAME_RE} (a scenario name)")
    if out.name != f"{name}.yaml":
        raise ArgumentError("--out", f"the scenario file must be named {name}.yaml: scenarios are looked up by file name")
    if out.exists() and not overwrite:  # someone's scenario: never replaced unasked
        raise StateError(out, "exists; nothing written (--overwrite replaces it)")
    layout = read_source(source)
    plan = plan_twin(layout, max_pp, tp_values, kv_policy)
    lines = render_plan(plan, layout)
    if not plan.ok:
        failed = [f"{i.name} ({i.detail})" for i in plan.invariants if not i.holds]
        raise UserError(f"{source}: the twin would break its invariants, nothing written: " + "; ".join(failed))
    from servematrix.report import atomic_write

    atomic_write(out, scenario_yaml(plan, name, layout))
    lines.append(f"scenario: {out}")
    if checkpoint_dir is not None:
        path = build_twin(plan, name, checkpoint_dir)
        lines += [f"checkpoint: {path}", diff(layout, read_local(path)).render()]
    return "\n".join(lines)


def cli_diff(source: str, twin: str) -> tuple[str, bool]:
    """`mirror --diff SOURCE TWIN`: what to print, and whether the names, dtypes and quantization
    config are equal (the CLI's exit status)."""
    report = diff(read_source(source), read_source(twin))
    return report.render(), report.equal
