"""What `servematrix mirror` writes and prints: the twin's scenario YAML (validated as a
Scenario before it is written), the plan as text, and the two CLI entry points.

Separate from twin.py, which writes the checkpoint: this is the command's side (arguments checked,
files named, text rendered), and it is the one part that reads servematrix's scenario schema.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from servematrix.errors import ArgumentError, StateError, UserError
from servematrix.mirror.diff import diff
from servematrix.mirror.layout import SourceLayout, field_value, rules
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.plan_models import Plan
from servematrix.mirror.source import check_twin_target, read_local, read_source
from servematrix.mirror.twin import build_twin

__all__ = ["cli_diff", "cli_mirror", "describe", "render_plan", "scenario_dict", "scenario_yaml"]


def max_model_len(plan: Plan, layout: SourceLayout) -> int:
    """The scenario's --max-model-len: the target, or the twin's absolute position table where that
    is shorter (GPT-2's n_positions 1024: vLLM refuses a longer max_model_len than the model derives)."""
    _, positions = field_value({**layout.config, **plan.spec.config}, "positions")
    target = rules()["targets"]["max_model_len"]
    return min(target, positions) if isinstance(positions, int) and positions > 0 else target


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
        "--enforce-eager", "--max-model-len", str(max_model_len(plan, layout)), "--max-num-seqs", "8"]
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
    if plan.device_overrides:
        text += " Changed from the source for this device: " + "; ".join(plan.device_overrides) + "."
    if plan.post:
        text += (" Post-processed after forging (so `servematrix run` from this file alone forges the twin WITHOUT "
                 "these steps; the mirrored checkpoint directory has them): "
                 + "; ".join(f"{s.op}: {s.detail}" for s in plan.post) + ".")
    return text


def render_plan(plan: Plan, layout: SourceLayout) -> list[str]:
    q = layout.quant
    st = layout.structure
    # files lists the shards whose headers were read: none for a model_type or config-only source,
    # whose layout is what transformers' class builds (for its defaults, or for the config)
    origin = ("headers only" if layout.files else "no safetensors header: the layout transformers' class builds for "
              + ("its defaults" if layout.kind == "model_type" else "the config"))
    lines = [f"source {layout.source}: {layout.model_type} ({', '.join(layout.architectures)}), "
             f"{len(layout.tensors):,} tensors in {len(layout.files)} files ({origin}), "
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
    lines += [f"device: {n}" for n in plan.device_overrides]
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
    # every place this run writes is checked before anything is read, planned or written: a
    # mirror that fails leaves both as they were
    from servematrix.files import atomic_write, check_dir, writable_target

    writable_target(out)  # a directory, FIFO or dangling link there: refused whatever --overwrite says
    if out.exists() and not overwrite:  # someone's scenario: never replaced unasked
        raise StateError(out, "exists; nothing written (--overwrite replaces it)")
    check_dir(out.parent)
    if checkpoint_dir is not None:
        check_twin_target(checkpoint_dir, keep=[out])
        check_dir(Path(os.path.abspath(checkpoint_dir)).parent)
    layout = read_source(source)
    plan = plan_twin(layout, max_pp, tp_values, kv_policy)
    lines = render_plan(plan, layout)
    if not plan.ok:
        failed = [f"{i.name} ({i.detail})" for i in plan.invariants if not i.holds]
        raise UserError(f"{source}: the twin would break its invariants, nothing written: " + "; ".join(failed))
    text = scenario_yaml(plan, name, layout)  # validated as a Scenario before any file is touched
    if checkpoint_dir is not None:
        # the twin first, the scenario last: a twin that cannot be forged leaves no scenario behind
        # that names it; a scenario that then cannot be written takes a twin this run created with it
        created = not Path(checkpoint_dir).exists()
        path = build_twin(plan, name, checkpoint_dir)
        try:
            report = diff(layout, read_local(path)).render()
            atomic_write(out, text)
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        lines += [f"scenario: {out}", f"checkpoint: {path}", report]
    else:
        atomic_write(out, text)
        lines.append(f"scenario: {out}")
    return "\n".join(lines)


def cli_diff(source: str, twin: str) -> tuple[str, bool]:
    """`mirror --diff SOURCE TWIN`: what to print, and whether the names, dtypes and quantization
    config are equal (the CLI's exit status)."""
    # TWIN first: a mistyped --diff is refused at once, not after SOURCE's model is built (a
    # `model_type:` source imports transformers and builds the model on the meta device: 30-80 s)
    twin_layout = read_source(twin, argument="--diff")
    report = diff(read_source(source), twin_layout)
    return report.render(), report.equal
