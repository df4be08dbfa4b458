"""cli.py, the command's side of `servematrix mirror`: a directory with a corrupt shard is one
UserError line and writes nothing, the scenario must be named after the twin, `--diff` reads both
sides from metadata and says equal or not (with what is not mirrored and why), and the CLI writes
a scenario once and refuses to replace it without --overwrite."""

from __future__ import annotations

import struct

import pytest

from servematrix.errors import UserError
from servematrix.mirror.cli import cli_mirror
from servematrix.mirror.plan import plan_twin
from servematrix.mirror.source import read_source
from servematrix.mirror.twin import build_twin
from tests.unit.mirror.sources import add_embeddings, dense_layers, llama_like, quantized, seed, write_checkpoint


def test_mirroring_a_directory_with_a_corrupt_shard_is_one_user_error_line_not_a_traceback(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", llama_like("llama", 2, 128, 2, 1, 64, 256, 300),
                          add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "F32"), 300, 128, "F32", False),
                          shards=2)
    shard = sorted(ck.glob("*.safetensors"))[1]
    shard.write_bytes(struct.pack("<Q", 2**40) + shard.read_bytes()[8:])
    with pytest.raises(UserError, match=rf"{shard.name}: corrupt safetensors header"):
        cli_mirror(str(ck), tmp_path / "twin.yaml", None, 2, [1, 2], "twin")
    assert not (tmp_path / "twin.yaml").exists()
    with pytest.raises(UserError, match="must be named twin.yaml"):
        cli_mirror(str(ck), tmp_path / "other.yaml", None, 2, [1, 2], "twin")


def test_cli_diff_of_a_twin_and_its_source_reads_both_from_metadata_and_says_equal_or_not(cache, tmp_path):
    from servematrix.mirror.cli import cli_diff

    _, seed_dir = seed("tiny-llama")
    plan = plan_twin(read_source(str(seed_dir)), 2, [1, 2])
    twin_dir = build_twin(plan, "llama-twin", tmp_path / "twin")
    text, equal = cli_diff(str(seed_dir), str(twin_dir))
    assert equal and "names, dtypes and quantization_config equal" in text
    assert "config intermediate_size: 256 -> 128" in text  # not mirrored, with the reason
    text, equal = cli_diff(str(seed_dir), str(seed("tiny-minimax-m2")[1]))  # another family: a dense MLP it lacks
    assert not equal and "only in the source: model.layers.0.mlp.down_proj.weight" in text


def test_mirror_cli_writes_the_scenario_once_and_refuses_to_replace_it(tmp_path, capsys):
    from servematrix.cli import main

    out = tmp_path / "scenarios" / "twin-llama.yaml"
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "1,2,4", "--pp", "2"]) == 0
    written = out.read_bytes()
    assert b"model_type: llama" in written and "scenario: " in capsys.readouterr().out
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == written
    assert main(["mirror", "model_type:llama", "--out", str(out), "--tp", "0"]) == 2  # TP out of range


def test_the_scenarios_max_model_len_is_the_twins_position_table_where_that_is_shorter():
    # GPT-2 has an absolute position table of n_positions 1024 (GPT2Config's default, the published
    # openai-community/gpt2's); vLLM refuses a --max-model-len above what the model derives
    from servematrix.mirror.cli import max_model_len
    from servematrix.mirror.layout import rules

    gpt2 = read_source("model_type:gpt2")
    assert max_model_len(plan_twin(gpt2, 2, [1, 2]), gpt2) == 1024
    llama = read_source("model_type:llama")  # 2048 positions: the target stands
    assert max_model_len(plan_twin(llama, 2, [1, 2]), llama) == rules()["targets"]["max_model_len"]


def test_a_missing_diff_twin_is_refused_before_the_source_is_read(tmp_path, monkeypatch):
    """`mirror model_type:llama --diff nowhere`: the mistyped TWIN is refused at once, before
    SOURCE's model is built on the meta device (the probe of #29 waited 28-83 s for it)."""
    from servematrix.mirror import cli

    read = []
    real = cli.read_source

    def recording(source, *args, **kw):
        read.append(source)
        return real(source, *args, **kw)

    monkeypatch.setattr(cli, "read_source", recording)
    with pytest.raises(UserError, match="--diff"):
        cli.cli_diff("model_type:llama", str(tmp_path / "nowhere"))
    assert read == [str(tmp_path / "nowhere")]
