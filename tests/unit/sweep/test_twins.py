"""Where the sweep's twins live: a directory named by what decides the twin's bytes, so a sweep of
other layouts (or a second sweep at the same time) builds beside a twin another sweep is loading
instead of replacing it, and a twin that exists is reused, not rewritten. Real mirror and forge
(transformers' llama class from its defaults), into a temporary cache."""

from pathlib import Path

from servematrix.sweep import twins


def test_twins_of_other_layouts_live_apart_and_an_existing_one_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "sweep-twins"
    tp1 = twins.build("llama", where, 1, [1])
    pp2 = twins.build("llama", where, 2, [1])
    assert tp1.ok and pp2.ok and tp1.path != pp2.path
    assert {p.name.split("-")[0] for p in where.iterdir()} == {"llama"} and len(list(where.iterdir())) == 2
    weights = next(p for p in (where / tp1.path).iterdir() if p.suffix == ".safetensors")
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    again = twins.build("llama", where, 1, [1])
    assert again.path == tp1.path
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before  # reused, not rebuilt in place


def test_a_twin_too_narrow_for_fp8_blocks_is_quantized_re_planned_as_wide_as_real_checkpoints(tmp_path, monkeypatch):
    """llama's twin (hidden 128, o_proj 128 inputs) cannot hold 128-wide K blocks at TP=2 (64 a rank):
    the quantized cell's twin is the same model_type re-planned with every width whole 128x128 blocks
    per rank (sweep-quants.yaml `widen`), and says so; without a way to widen it stays not checkable."""
    from safetensors import safe_open

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "sweep-twins"
    base = twins.build("llama", where, 2, [1, 2])
    narrow = twins.quantize(base, "fp8-block", [2])
    assert not narrow.ok and "cannot hold the layout" in narrow.reason
    built = []
    wide = twins.quantize(base, "fp8-block", [2],
                          lambda units: built.append(units) or twins.build("llama", where, 2, [1, 2], align=units))
    assert wide.ok and "128x128 blocks" in wide.note and "widened" in wide.note
    assert built == [{"all": 128, "ffn": 128, "kv_out": 128, "attn_out": 128, "attn_in": 128}]
    shapes = {}
    for shard in Path(wide.path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shapes |= {n: f.get_slice(n).get_shape() for n in f.keys()}
    o_proj = shapes["model.layers.0.self_attn.o_proj.weight"]
    assert o_proj[1] % (2 * 128) == 0  # row-parallel: each of 2 ranks holds whole 128-wide K blocks


def test_a_fused_qkv_twin_is_widened_with_whole_blocks_in_each_section_per_rank(tmp_path, monkeypatch):
    """phi3's twin (microsoft/Phi-3-mini-4k-instruct's published config; fused qkv_proj, 64 K a rank at TP=2)
    is widened for fp8-block at TP=2 too: 8 heads and 8 KV heads of 96, its qkv_proj [2304, 768] written in
    128x128 blocks whose 18 scale rows are 3 per section a rank (q, k, v of 384 rows), as vLLM's fused loader
    reads them. Widened as before (2 KV heads) the k/v sections straddled blocks and vLLM's load_qkv_weight
    failed ("start (8) + length (2) exceeds dimension size (9)")."""
    from safetensors import safe_open

    from servematrix.sweep.quant import widen_units

    units, _ = widen_units("awq", {"model.layers.0.self_attn.q_proj.weight": (128, 128)})
    assert units["attn_in"] == 128 and units["kv_out"] == 8
    assert widen_units("none", {}) is None
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "sweep-twins"
    base = twins.build("phi3", where, 2, [1, 2])
    assert base.ok and not twins.quantize(base, "fp8-block", [2]).ok  # too narrow, nothing to widen it with
    wide = twins.quantize(base, "fp8-block", [2], lambda units: twins.build("phi3", where, 2, [1, 2], align=units))
    assert wide.ok and "128x128 blocks" in wide.note and "widened" in wide.note, wide.reason
    shapes = {}
    for shard in Path(wide.path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shapes |= {n: f.get_slice(n).get_shape() for n in f.keys()}
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == [2304, 768]
    assert shapes["model.layers.0.self_attn.qkv_proj.weight_scale_inv"] == [18, 6]


def test_a_reused_twin_keeps_its_released_spellings_and_is_not_rewritten_again(tmp_path, monkeypatch):
    """deepseek_v4's twin is rewritten into DeepSeek-V4-Flash's spelling (compress_ratios from the
    class's layer_types, which the rewrite drops): a second sweep over the same twin reuses it as it
    is and says the same, where re-applying the rewrite found no layer_types and refused the twin
    (the 0.32.0 zoo of 2026-12-06, second session: every deepseek_v4 cell not checkable)."""
    import json

    monkeypatch.setenv("SERVEMATRIX_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "sweep-twins"
    first = twins.build("deepseek_v4", where, 2, [1, 2])
    assert first.ok, first.reason
    config = (where / first.path / "config.json").read_text()
    assert "compress_ratios" in json.loads(config) and "layer_types" not in json.loads(config)
    again = twins.build("deepseek_v4", where, 2, [1, 2])
    assert again.ok, again.reason
    assert again.path == first.path and again.origin == first.origin and "compress_ratios" in again.origin
    assert (where / again.path / "config.json").read_text() == config
