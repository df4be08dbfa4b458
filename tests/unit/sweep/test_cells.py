"""Cell ids read like run ids and `-k` selects them as `run -k` selects entries; layouts and
quantizations are refused with the argument named."""

import pytest

from servematrix.errors import ArgumentError
from servematrix.sweep import cells
from servematrix.sweep.registry import Arch

LLAMA = Arch(arch="LlamaForCausalLM", kind="text", model_type="llama", forgeable=True)
LLAVA = Arch(arch="LlavaForConditionalGeneration", kind="multimodal", reason="multimodal: ...")


def test_layouts_parse_to_tp_and_pp():
    got = {lay.name: (lay.tp, lay.pp) for lay in cells.layouts("tp1,tp2,pp2,tp2pp2,tp4")}
    assert got == {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2), "tp4": (4, 1)}


@pytest.mark.parametrize("text", ["tp0", "dp2", "pp2tp2", "tp", ",", "tp2 pp2"])
def test_a_bad_layout_is_one_argument_error(text):
    with pytest.raises(ArgumentError, match="--layouts"):
        cells.layouts(text)


def test_quantizations_not_implemented_are_refused_not_skipped():
    assert cells.quants("none,none") == ["none"]
    assert cells.quants("none,fp8-block,fp8-kv,awq,gptq") == ["none", "fp8-block", "fp8-kv", "awq", "gptq"]
    with pytest.raises(ArgumentError, match="--quant.*nvfp4.*checks none, fp8-block, fp8-kv, awq, gptq"):
        cells.quants("awq,nvfp4")


def test_ids_name_the_model_type_layout_quant_and_a_release_other_than_current():
    lays = cells.layouts("tp1,pp2")
    got = [c.id for c in cells.cells([LLAMA, LLAVA], lays, ["none"], ["current", "cpu-0.20.2"])]
    assert got == ["llama/tp1-none", "llama/pp2-none", "LlavaForConditionalGeneration/tp1-none",
                   "LlavaForConditionalGeneration/pp2-none", "llama/tp1-none-cpu-0.20.2", "llama/pp2-none-cpu-0.20.2",
                   "LlavaForConditionalGeneration/tp1-none-cpu-0.20.2", "LlavaForConditionalGeneration/pp2-none-cpu-0.20.2"]
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("pattern, want", [
    ("llama/*", ["llama/tp1-none", "llama/tp2-none", "llama/pp2-none", "llama/tp2pp2-none"]),
    ("pp2", ["llama/pp2-none", "llama/tp2pp2-none", "Llava/pp2-none", "Llava/tp2pp2-none"]),
    ("*/tp1-*,*/tp2-*", ["llama/tp1-none", "llama/tp2-none", "Llava/tp1-none", "Llava/tp2-none"]),
    ("tag:multimodal", ["Llava/tp1-none", "Llava/tp2-none", "Llava/pp2-none", "Llava/tp2pp2-none"]),
    ("tag:forgeable,Llava/tp1*", ["llama/tp1-none", "llama/tp2-none", "llama/pp2-none", "llama/tp2pp2-none",
                                  "Llava/tp1-none"]),
])
def test_k_selects_like_run_k(pattern, want):
    llava = LLAVA.model_copy(update={"arch": "Llava"})
    all_cells = cells.cells([LLAMA, llava], cells.layouts(",".join(cells.LAYOUTS)), ["none"], ["current"])
    assert [c.id for c in cells.select(all_cells, pattern)] == want


def test_a_pooling_cell_is_keyed_by_its_architecture_and_tagged_pooling_beside_its_generative_sibling():
    qwen2 = Arch(arch="Qwen2ForCausalLM", kind="text", model_type="qwen2", forgeable=True)
    embed = Arch(arch="Qwen2Model", kind="embedding", model_type="qwen2", forgeable=True)
    got = cells.cells([qwen2, embed], cells.layouts("tp1"), ["none"], ["current"])
    assert [c.id for c in got] == ["qwen2/tp1-none", "Qwen2Model/tp1-none"]
    assert "pooling" in got[1].tags and "qwen2" in got[1].tags and "pooling" not in got[0].tags
    assert [c.id for c in cells.select(got, "tag:pooling")] == ["Qwen2Model/tp1-none"]
