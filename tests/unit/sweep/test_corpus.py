"""The sweep's twins carry the released checkpoint's tensors, not every tensor transformers' class
saves: a drop rule (mirror-families.yaml checkpoint_names drop_from) leaves out the weights the class
allocates for LongCat-Flash's identity "zero experts", which no released checkpoint holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from servematrix.sweep import twins


def _experts(twin) -> tuple[dict, list[str]]:
    """The twin's config and tensor names, after asserting it holds tensors for its routed experts only:
    none for the zero experts the router also scores."""
    assert twin.ok, twin.reason
    config = json.loads((Path(twin.path) / "config.json").read_text())
    names = []
    for shard in Path(twin.path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names += list(f.keys())
    experts = {int(m.group(1)) for n in names if (m := re.search(r"\.mlp\.experts\.(\d+)\.", n))}
    assert experts == set(range(config["n_routed_experts"])) and config["zero_expert_num"] > 0
    return config, names


def test_longcat_flash_twin_holds_weights_for_its_routed_experts_only(tmp_path):
    twin = twins.build("longcat_flash", tmp_path, 2, [1, 2])
    config, names = _experts(twin)  # gate/up/down for each routed expert
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert sum(1 for n in names if "layers.0.mlp.experts." in n and n.endswith(f".{leaf}.weight")) \
            == config["n_routed_experts"]
    assert "drop_from" in twin.origin


def test_longcat_flash_quantized_twin_holds_its_routed_experts_only(tmp_path):
    """The quantized twin is forged afresh from the spec (transformers' names): it gets the same
    rewrite, its quantized leaves (weight_scale_inv) dropped or renamed with their linear's weight."""
    base = twins.build("longcat_flash", tmp_path, 1, [1])
    twin = twins.quantize(base, "fp8-block", [1],
                          lambda units: twins.build("longcat_flash", tmp_path, 1, [1], align=units))
    _, names = _experts(twin)
    assert any(n.endswith(".gate_proj.weight_scale_inv") for n in names)
    assert json.loads((Path(twin.path) / twins.REWRITES_FILE).read_text())


def test_rename_rules_take_a_quantized_leaf_with_its_weight():
    from servematrix.sweep.corpus import _as_weight, _renamed

    rule = [{"pattern": r"^(model\.layers\.\d+\.mlp)\.linear_gate\.weight$", "name": r"\1.gate_proj.weight"}]
    assert _renamed("model.layers.0.mlp.linear_gate.weight", rule) == "model.layers.0.mlp.gate_proj.weight"
    assert _renamed("model.layers.0.mlp.linear_gate.qweight", rule) == "model.layers.0.mlp.gate_proj.qweight"
    assert _renamed("model.layers.0.mlp.linear_gate.weight_scale_inv", rule) \
        == "model.layers.0.mlp.gate_proj.weight_scale_inv"
    assert _renamed("model.layers.0.mlp.other.scales", rule) == "model.layers.0.mlp.other.scales"
    assert _as_weight("model.norm.weight") == ("model.norm.weight", None)
