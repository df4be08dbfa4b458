"""A multimodal composite as a sweep cell on real vLLM (the CPU build): llava (LlavaForConditionalGeneration)
at TP=1 and PP=2, its twin forged from llava-hf/llava-1.5-7b-hf's published config (text model, CLIP
vision tower, projector, the published tensor names). The cells must pass with vLLM's Llava built, and
every distinctive tensor of the twin vLLM keeps whole must sit in its parameters bit for bit (the vision
layer past vLLM's feature layer and post_layernorm are in the checkpoint and unread by design, as the
published 24th layer is); the same twin less a projector bias loads in vLLM (its own check exempts unquantized
linears) and the sweep names the parameter left unfilled, so the check can fail."""

import json
import re
import shlex
import shutil
import sys

import pytest

from .conftest import servematrix, sweep, twin_of

pytestmark = pytest.mark.integration
# vLLM 0.32.0's llava.py imports pixtral.py, which imports transformers' Pixtral image processor, which imports
# torchvision: a requirement vLLM declares that this repository's .venv lacks (the sweep then says the cells need
# a library this CPU install lacks). Where torchvision imports, the cells are checked
pytest.importorskip("torchvision", reason="vLLM's llava module imports torchvision (via pixtral), not installed here")
CELLS = ("llava/tp1-none", "llava/pp2-none")
# fused by vLLM (qkv_proj, gate_up_proj: no parameter holds one whole) or unread by design (vision_feature_layer -2:
# vLLM builds the tower up to its second-to-last layer and without post_layernorm)
NOT_WHOLE = re.compile(r"\.(q|k|v|gate|up)_proj\.|vision_model\.encoder\.layers\.1\.|vision_model\.post_layernorm\.")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("multimodal") / "run"
    proc, by_id = sweep(out, "tp1,pp2", "llava/*", shared_cache)
    return proc, out, by_id


def test_the_llava_cells_pass_with_vllm_s_llava_built(swept):
    proc, out, by_id = swept
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert {i: r["verdict"] for i, r in by_id.items()} == {c: "pass" for c in CELLS}
    for cell in CELLS:
        ranks = [json.loads(p.read_text()) for p in sorted((out / cell / "loadcheck").glob("rank*.json"))]
        assert ranks and all(r["ok"] and r["model"] == "LlavaForConditionalGeneration" for r in ranks)
        assert "published config llava-hf/llava-1.5-7b-hf" in by_id[cell]["note"]
        assert "every parameter outside the fused ones holds a tensor of the twin" in by_id[cell]["note"]


@pytest.mark.parametrize("cell", CELLS)
def test_every_tensor_vllm_keeps_whole_is_in_its_parameters_bit_for_bit(swept, cell):
    from servematrix.sweep import multimodal

    _, out, by_id = swept
    found = multimodal.loaded(twin_of(by_id[cell]), out / cell / "loadcheck")
    whole = [t for t in found if not NOT_WHOLE.search(t.name)]
    assert len(whole) >= 30 and [t.name for t in whole if not t.loaded] == []
    for part in ("language_model.", "vision_tower.vision_model.", "multi_modal_projector."):
        assert any(t.loaded and t.name.startswith(part) for t in whole), part
    # what is not found is what vLLM fuses or never builds, nothing else
    assert {re.sub(r"\d+", "N", t.name) for t in found if not t.loaded} <= \
        {re.sub(r"\d+", "N", t.name) for t in found if NOT_WHOLE.search(t.name)}


def test_a_twin_without_a_projector_tensor_loads_in_vllm_and_the_sweep_finds_the_unfilled_parameter(swept, tmp_path):
    """vLLM 0.32.0's "not initialized from checkpoint" check exempts every module whose quant method has
    process_weights_after_loading, which an unquantized linear's has: a checkpoint without a linear's bias
    loads, the parameter holding whatever memory held. The sweep's note names it, and the cell is no pass."""
    from safetensors.torch import load_file, save_file

    from servematrix.serve import loadcheck
    from servematrix.serve.server import LaunchSpec
    from servematrix.sweep import multimodal

    _, _, by_id = swept
    record = by_id["llava/tp1-none"]
    bare = tmp_path / "no-projector-bias"
    shutil.copytree(twin_of(record), bare)
    tensors = load_file(bare / "model.safetensors")
    tensors.pop("multi_modal_projector.linear_2.bias")
    save_file(tensors, bare / "model.safetensors", metadata={"format": "pt"})
    argv = shlex.split(record["server_command"])
    argv = argv[argv.index("--model"):]  # the server's arguments, after the worker's own flags
    argv[1] = str(bare)
    spec = LaunchSpec(argv=[sys.executable, "-m", loadcheck.SERVER_MODULE, *argv],
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"}, port=0, log_path=tmp_path / "check.log", startup_timeout=150)
    loadcheck.run(spec, loadcheck.Check(attention={}, out=tmp_path / "check"))  # vLLM: loaded
    assert multimodal.unread_params(bare, tmp_path / "check") == ["multi_modal_projector.linear_2.bias"]
