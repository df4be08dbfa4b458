"""The forge's `quantize:` option: each method forged from a scenario's YAML writes the tensor
names, dtypes and shapes the mirror plans for a header-only checkpoint of that method (laid out by
hand in tests/unit/mirror/sources.py) and the quantization_config the real checkpoints carry; the
stored values dequantize to the forged weights within the method's quantization error, packed as
vLLM's own packers pack them; a spec that cannot be written is refused at its field."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from servematrix.checkpoint.forge import forge
from servematrix.config.forge_spec import ForgeSpec
from servematrix.checkpoint.quant_pack import AWQ_ORDER, _unpack, dequantize
from servematrix.config.scenario import ScenarioStore
from servematrix.errors import ConfigError
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_local, read_source
from tests.unit.mirror.sources import add_embeddings, dense_layers, llama_like, quantized, write_checkpoint

# a Llama the mirror keeps as it is at TP=1 (its widths are the mirror's targets): 2 layers, hidden
# 128, 2 heads / 1 KV head of 64, FFN 64; vocab 512, the mirror's
DIMS = dict(layers=2, hidden=128, heads=2, kv=1, hd=64, ffn=64)
CONFIG = {"hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 2048}
SPEC_YAML = """\
model_type: llama
architecture: LlamaForCausalLM
config: {config}
dtype: {dtype}
tokenizer: {{vocab_size: 512, chat_template: false}}
quantize: {quantize}
"""
# method -> (quantize: as a scenario writes it, the forged dtype, sources.quantized's scheme, the
# quantization_config as the real checkpoints of the method spell it)
METHODS = {
    "fp8-block": ("[{method: fp8-block, block: [64, 64]}]", "bfloat16", "fp8_block",
                  {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [64, 64]}),
    "fp8-tensor": ("[{method: fp8-tensor}]", "bfloat16", "fp8_tensor",
                   {"quant_method": "fp8", "activation_scheme": "static"}),
    "awq": ("[{method: awq, group_size: 64}]", "float16", "awq",
            {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True,
             "modules_to_not_convert": None}),
    "gptq": ("[{method: gptq, group_size: 64}]", "float16", "gptq",
             {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True, "lm_head": False,
              "checkpoint_format": "gptq"}),
    "nvfp4": ("[{method: nvfp4, ignore: ['model.layers.*.self_attn']}, {method: kv_cache_scales}]", "bfloat16", "nvfp4",
              {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["model.layers.*.self_attn"],
               "producer": {"name": "modelopt"}, "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}}),
}
CODE = {"bfloat16": "BF16", "float16": "F16"}


def _spec(method: str) -> ForgeSpec:
    quantize, dtype, _, _ = METHODS[method]
    return ForgeSpec(**yaml.safe_load(SPEC_YAML.format(config=json.dumps(CONFIG), dtype=dtype, quantize=quantize)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the session's forge cache (tests/conftest.py's autouse one is per test: too late for module fixtures)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVEMATRIX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="module")
def forged(cache):
    return {m: forge(f"unit-q-{m}", _spec(m)) for m in METHODS}


@pytest.fixture(scope="module")
def reference(cache):
    """The same spec unquantized, in float32: the weights the quantized checkpoints stand for."""
    spec = _spec("awq").model_copy(update={"quantize": [], "dtype": "float32"})
    return load_file(forge("unit-q-reference", spec) / "model.safetensors")


def _header_only_source(tmp_path, method: str):
    _, dtype, scheme, qc = METHODS[method]
    group = {"awq": 64, "gptq": 64}.get(method, 128)
    t = quantized(dense_layers(DIMS["layers"], DIMS["hidden"], DIMS["heads"], DIMS["kv"], DIMS["hd"], DIMS["ffn"]),
                  scheme, CODE[dtype], group=group)
    if method == "fp8-block":  # sources.quantized writes 128-blocks; this spec asks for 64
        t = {n: (d, [-(-t[n[:-10]][1][0] // 64), -(-t[n[:-10]][1][1] // 64)]) if n.endswith("_scale_inv") else (d, s)
             for n, (d, s) in t.items()}
    if method == "nvfp4":
        for i in range(DIMS["layers"]):
            t[f"model.layers.{i}.self_attn.k_proj.k_scale"] = ("F32", [])
            t[f"model.layers.{i}.self_attn.v_proj.v_scale"] = ("F32", [])
    cfg = llama_like("llama", DIMS["layers"], DIMS["hidden"], DIMS["heads"], DIMS["kv"], DIMS["hd"], DIMS["ffn"], 512,
                     quantization_config=qc, torch_dtype=dtype, max_position_embeddings=2048)
    return read_source(str(write_checkpoint(tmp_path / f"src-{method}", cfg, add_embeddings(t, 512, DIMS["hidden"],
                                                                                           CODE[dtype], False))))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_forged_from_yaml_is_the_mirrors_plan_of_a_header_only_source_of_it(forged, tmp_path, method):
    source = _header_only_source(tmp_path, method)
    plan = plan_twin(source, max_pp=DIMS["layers"], tp_values=[1])
    assert plan.ok, [i for i in plan.invariants if not i.holds]
    twin = read_local(forged[method])
    assert {n: (m.dtype, m.shape) for n, m in twin.tensors.items()} == {n: (m.dtype, m.shape) for n, m in plan.twin.items()}
    assert twin.config["quantization_config"] == METHODS[method][3] == source.quant.config
    assert twin.quant.schemes == source.quant.schemes and twin.quant.kv_scales == source.quant.kv_scales


def _leaves(tensors: dict, prefix: str) -> dict:
    return {n[len(prefix) + 1:]: t for n, t in tensors.items() if n.startswith(prefix + ".")}


# the largest error each method's rounding allows, relative to the weight's absolute maximum: half
# a step of 448 (FP8 e4m3's 3 mantissa bits: 1/16 of the value), of 15 (4-bit), of e2m1's grid
BOUND = {"fp8-block": 1 / 16, "fp8-tensor": 1 / 16, "awq": 0.5 * 2 / 15 + 0.01, "gptq": 0.5 * 2 / 15 + 0.01,
         "nvfp4": 1 / 6 + 0.05}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_stored_values_dequantize_to_the_forged_weights_within_quantization_error(forged, reference, method):
    tensors = load_file(forged[method] / "model.safetensors")
    spec = _spec(method)
    q = spec.quantize[0]
    names = [n for n in reference if q.selects(n)]
    floats = (torch.float16, torch.bfloat16, torch.float32)
    assert names and not any(n in tensors and tensors[n].dtype in floats for n in names)  # every one stored quantized
    for name in names:
        w = reference[name]
        d = dequantize(q, _leaves(tensors, name[: -len(".weight")]))
        err = ((d - w).abs().max() / w.abs().max()).item()
        assert err <= BOUND[method], (name, err)
        assert torch.corrcoef(torch.stack([d.flatten(), w.flatten()]))[0, 1] > 0.99
    if method == "nvfp4":  # its ignore keeps attention in the model's dtype
        assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
        assert float(tensors["model.layers.1.self_attn.v_proj.v_scale"]) == 1.0


def test_the_packing_is_vllms_own(forged):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import break_fp4_bytes
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack, gptq_pack

    awq = load_file(forged["awq"] / "model.safetensors")["model.layers.0.mlp.down_proj.qweight"]
    codes = _unpack(awq, 4, 1, AWQ_ORDER)  # [k, n]
    assert torch.equal(awq_pack(codes, 4, *codes.shape), awq)
    gptq = load_file(forged["gptq"] / "model.safetensors")["model.layers.0.mlp.down_proj.qweight"]
    codes = _unpack(gptq, 4, 0)
    assert torch.equal(gptq_pack(codes, 4, *codes.shape), gptq)
    nv = load_file(forged["nvfp4"] / "model.safetensors")
    spec = _spec("nvfp4").quantize[0]
    leaves = _leaves(nv, "model.layers.0.mlp.up_proj")
    scale = (leaves["weight_scale"].float() * leaves["weight_scale_2"]).repeat_interleave(16, 1)
    assert torch.equal(break_fp4_bytes(leaves["weight"], torch.float32) * scale, dequantize(spec, leaves))


def _refused(quantize, config=CONFIG, **kw) -> str:
    with pytest.raises(ValidationError) as info:
        ForgeSpec(model_type="llama", architecture="LlamaForCausalLM", config=config, quantize=quantize, **kw)
    err = info.value.errors()[0]
    return ".".join(map(str, err["loc"] + err.get("ctx", {}).get("at", ()))) + ": " + err["msg"]


@pytest.mark.parametrize("quantize, config, kw, where", [
    ([{"method": "awq"}], {**CONFIG, "intermediate_size": 320}, {},
     "quantize.0.group_size: model.layers.0.mlp.down_proj.weight [128, 320] (config intermediate_size): in_features "
     "320 is not a multiple of group 128"),
    ([{"method": "gptq", "group_size": 64}], {**CONFIG, "num_key_value_heads": 2, "head_dim": 36}, {},
     "quantize.0.group_size: model.layers.0.self_attn.o_proj.weight [128, 72] (config hidden_size): in_features 72"),
    ([{"method": "awq", "group_size": 32}], {**CONFIG, "head_dim": 36}, {},
     "quantize.0.group_size: model.layers.0.self_attn.k_proj.weight [36, 128] (config num_key_value_heads): "
     "out_features 36 is not a multiple of pack 8"),
    ([{"method": "fp8-block"}], CONFIG, {}, "quantize.0.block: model.layers.0.self_attn.k_proj.weight [64, 128] (config num_key_value_heads): "
     "out_features 64 is not a multiple of block_n 128"),
    ([{"method": "awq", "bits": 3}], CONFIG, {}, "quantize.0.awq.bits: Input should be 4"),
    ([{"method": "int3"}], CONFIG, {}, "quantize.0: Input tag 'int3' found using 'method' does not match"),
    ([{"method": "awq", "group_size": 64}, {"method": "gptq", "group_size": 64}], CONFIG, {},
     "quantize.1.method: one weight method per checkpoint"),
    ([{"method": "gptq", "group_size": 64}, {"method": "kv_cache_scales"}], CONFIG, {},
     "quantize.1.method: vLLM's gptq config gives attention no KV-cache method"),
    ([{"method": "kv_cache_scales"}], CONFIG, {}, "quantize.0.method: kv_cache_scales needs a weight method"),
    ([{"method": "kv_cache_scales", "k_scale": "model.layers.0.k_scale"}], CONFIG, {}, "quantize.0.kv_cache_scales.k_scale"),
    ([{"method": "nvfp4"}], CONFIG, {"config_json": {"quantization_config": {"quant_method": "awq"}}},
     "config_json.quantization_config.quant_method: 'awq' is not a nvfp4 checkpoint's method"),
    ([{"method": "fp8-tensor", "input_scale": 0}], CONFIG, {}, "quantize.0.fp8-tensor.input_scale: Input should be greater"),
])
def test_a_spec_that_cannot_be_written_is_refused_at_its_field(quantize, config, kw, where):
    assert where in _refused(quantize, config, **kw)


def test_a_refused_spec_in_a_scenario_file_names_its_file_line_and_field(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("name: q\nmodel:\n  forge:\n    model_type: llama\n    architecture: LlamaForCausalLM\n"
                    f"    config: {json.dumps({**CONFIG, 'intermediate_size': 320})}\n"
                    "    quantize:\n      - {method: awq, group_size: 128}\n"
                    "quants: {bf16: {args: [--dtype, bfloat16]}}\nsmoke: {prompts: [{name: p, prompt: hi}]}\n")
    with pytest.raises(ConfigError) as info:
        ScenarioStore(tmp_path).get("q")
    assert (info.value.line, info.value.field) == (8, "model.forge.quantize.0.group_size")


def test_a_glob_that_selects_nothing_or_a_layout_the_weight_cannot_hold_is_refused_by_the_forge():
    base = _spec("awq").model_dump()
    nothing = ForgeSpec(**{**base, "quantize": [{"method": "awq", "group_size": 64, "tensors": ["*.no_such_proj.weight"]}]})
    with pytest.raises(ValueError, match=r"quantize\[0\] \(awq\): no weight matches"):
        forge("unit-q-nothing", nothing)
    norm = ForgeSpec(**{**base, "quantize": [{"method": "awq", "group_size": 64, "tensors": ["model.norm.weight"]}]})
    with pytest.raises(ValueError, match=r"quantize\[0\] \(awq\): model.norm.weight \[128\]: 1-D"):
        forge("unit-q-norm", norm)


def test_the_cache_tells_a_quantized_spec_from_its_plain_one():
    assert _spec("awq").model_copy(update={"quantize": []}).key() != _spec("awq").key() != _spec("gptq").key()


def test_an_fp8_ignore_glob_is_written_as_the_modules_it_names_which_stay_float():
    # vLLM's Fp8Config matches its ignored layers by exact name: a glob there would skip nothing
    base = _spec("fp8-block").model_dump()
    spec = ForgeSpec(**{**base, "quantize": [{"method": "fp8-block", "block": [64, 64],
                                              "ignore": ["model.layers.*.mlp.down_proj", "lm_head"]}]})
    out = forge("unit-q-ignore", spec)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignored_layers"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.down_proj.weight_scale_inv" not in tensors
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_kv_cache_scales_go_on_the_layers_holding_their_module_and_a_module_none_holds_is_refused():
    base = _spec("fp8-block").model_dump()
    attn = [{"method": "fp8-block", "block": [64, 64]},
            {"method": "kv_cache_scales", "k_scale": "model.layers.{layer}.self_attn.k_scale",
             "v_scale": "model.layers.{layer}.self_attn.v_scale"}]
    tensors = load_file(forge("unit-q-kv-attn", ForgeSpec(**{**base, "quantize": attn})) / "model.safetensors")
    assert {n for n in tensors if n.endswith("_scale") and ".self_attn." in n and "proj" not in n} == {
        f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in ("k_scale", "v_scale")}
    nowhere = [attn[0], {"method": "kv_cache_scales", "k_scale": "model.layers.{layer}.mixer.k_proj.k_scale",
                         "v_scale": "model.layers.{layer}.mixer.v_proj.v_scale"}]
    with pytest.raises(ValueError, match=r"kv_cache_scales: no layer holds model.layers.\{layer\}.mixer.k_proj"):
        forge("unit-q-kv-nowhere", ForgeSpec(**{**base, "quantize": nowhere}))
