"""diff.py compares a twin with its source: a missing tensor is reported with its reason and a
changed dtype with both dtypes, and without the twin's mirror.json the layer map is inferred from
the layer kinds, so the comparison still comes out equal."""

from __future__ import annotations

from servematrix.mirror.diff import diff, infer_layer_map
from servematrix.mirror.layout import SourceLayout
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_local, read_source
from servematrix.mirror.twin import build_twin
from tests.unit.mirror.sources import seed


def test_diff_reports_a_missing_tensor_and_a_changed_dtype_with_reasons(cache, tmp_path):
    _, seed_dir = seed("tiny-minimax-m2-kvscale")
    source = read_source(str(seed_dir))
    twin = source.tensors.copy()
    twin.pop("model.layers.1.self_attn.v_proj.v_scale")
    twin["model.layers.0.self_attn.v_proj.v_scale"] = twin.pop("model.layers.0.self_attn.v_proj.v_scale").model_copy(
        update={"dtype": "BF16"})
    broken = SourceLayout(**{**source.__dict__, "tensors": twin, "source": "broken"})
    report = diff(source, broken)
    assert not report.equal
    assert [i.name for i in report.only_in_source] == ["model.layers.1.self_attn.v_proj.v_scale"]
    assert report.only_in_source[0].reason.startswith("unexplained")
    assert [(d.name, d.source, d.twin) for d in report.dtypes] == [("model.layers.0.self_attn.v_proj.v_scale", ["F32"], ["BF16"])]


def test_without_mirror_json_diff_infers_the_layer_map_from_the_layer_kinds(cache, tmp_path):
    _, seed_dir = seed("tiny-glm-5.1-dsa")
    source = read_source(str(seed_dir))
    plan = plan_twin(source, max_pp=2, tp_values=[1, 2])
    twin_dir = build_twin(plan, "dsa-twin", tmp_path / "twin")
    (twin_dir / "mirror.json").unlink()
    twin = read_local(twin_dir)
    assert twin.origin is None
    # the map the plan made, inferred back from the layer kinds alone (which layers the plan keeps
    # is plan.py's rule: since ad30870 it keeps a layer past the first-dense ones on every PP rank)
    assert infer_layer_map(source, twin) == plan.layer_map
    assert diff(source, twin).equal
