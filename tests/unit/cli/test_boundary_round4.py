"""Trust at the boundary, round 4 (issue 29): what a fourth, fresh probe of the ten classes found
(docs/boundary-probe-round4.md). Each test fails on the tree the probe started from (c2d8073):
a refused sweep resolved and cached an undeclared release first; the sweep's regression list and
final line, and the run's last line, printed ids, signatures and paths raw; a tensor name holding a
control character reached the twin's spec as an internal error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from servematrix.cli import main
from servematrix.errors import ArgumentError

from ..mirror.sources import header_only
from .test_boundary_cases import _never_serve, check, snapshot, work  # noqa: F401
from .test_boundary_round3_leftovers import ScriptedRegistry, assert_terminal_safe, registry  # noqa: F401

ESC = "\x1b]0;owned\x07\x1b[2J"  # retitle the terminal, clear the screen


# --- sweep: a refused --out writes nothing, not even the recipe of the release it names ----------

def test_a_sweep_refused_for_its_out_resolves_and_caches_no_release_first(work, registry, capsys):
    work.file("notes.txt", "mine\n")
    before = snapshot(work.tmp)
    check(capsys, work.tmp, ["sweep", "--vllm", "0.33.0", "--out", "notes.txt"], 2,
          ["notes.txt", "not a directory"])
    assert snapshot(work.tmp) == before  # no cache/releases/cpu/cpu-0.33.0.json, no listings
    assert registry.asked == []  # refused before the registry was asked at all


@pytest.mark.parametrize("text", ["tp1\u0662", "tp2pp1\uff12", "tp2,pp\u0663"])
def test_a_layout_with_a_digit_of_another_script_is_refused_not_read_as_tp12(text):
    from servematrix.sweep.cells import layouts

    with pytest.raises(ArgumentError, match="--layouts: .* is not a layout"):
        layouts(text)  # int('1\u0662') is 12: the cell id would hold a name no other command reads
    assert [(lay.name, lay.tp, lay.pp) for lay in layouts(" tp12 ,pp2")] == [("tp12", 12, 1), ("pp2", 1, 2)]


# --- sweep and run: what they print at the end is escaped --------------------------------------

def test_the_sweep_prints_its_regression_list_and_run_directory_escaped_and_bounded(work, capsys, monkeypatch):
    from servematrix.sweep import runner

    out = work.root / f"s{ESC}"
    ran = []

    def scripted_run(opts):  # the sweep's orchestration is runner.py's; here only what the CLI prints of it
        ran.append(opts)
        out.mkdir()
        (out / "regressions.json").write_text(json.dumps([{
            "before": "current", "after": f"cpu-0.20.2{ESC}", "compared": 1,
            "newly_failing": [f"llama/tp1-none: pass -> fail (KeyError{ESC}\nforged: PASS" + "x" * 100_000 + ")"],
            "newly_passing": []}]))
        return SimpleNamespace(run_dir=str(out), counts={"pass": 0, "fail": 1}, exit_code=1)

    monkeypatch.setattr(runner, "run", scripted_run)
    assert main(["sweep", "--vllm", "current", "--vllm", "cpu-0.20.2", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert ran and ran[0].releases == ["current", "cpu-0.20.2"]
    assert_terminal_safe(text)
    assert len(text.splitlines()) == 3  # the pair, one newly failing cell, the final line: nothing forged
    assert "\\x1b" in text and "newly failing: llama/tp1-none" in text  # shown, not swallowed
    assert max(len(line) for line in text.splitlines()) < 2_000


def test_the_run_prints_its_reports_path_escaped(work, capsys, monkeypatch):
    from servematrix.run import session

    work.file("scenarios/a.yaml", "name: a\nmodel:\n  path: /nonexistent\nquants:\n  fp32: {args: [--dtype, float32]}\n"
                                  "smoke:\n  prompts:\n    - {name: p, prompt: hi}\n")
    work.file("matrix/m.yaml", "name: m\nscenarios: [a]\n")

    class ScriptedSession:  # the run itself is session.py's; here only the CLI's last lines
        def __init__(self, entries):
            self.entries = entries

        @classmethod
        def of(cls, matrix, entries, opts):
            return cls(entries)

        def run(self):
            return SimpleNamespace(status="complete", counts={"pass": len(self.entries)}, exit_code=0)

    monkeypatch.setattr(session, "Session", ScriptedSession)
    assert main(["run", "matrix/m.yaml", "--out", f"r{ESC}"]) == 0
    text = capsys.readouterr().out
    assert_terminal_safe(text)
    assert "reports: r\\x1b]0;owned\\x07\\x1b[2J/summary.json" in text


# --- mirror: a tensor name is one line of text, refused where the header or index is read -------

def _header(path: Path, names: list[str]) -> None:
    header_only(path, {name: ("BF16", [4]) for name in names})


@pytest.mark.parametrize("name", [f"model.extra{ESC}.weight", "model.norm\n.weight", "a\u2028b", "", "x" * 1001])
def test_a_tensor_name_that_is_not_one_line_is_a_corrupt_header_not_an_internal_error(tmp_path, name):
    from servematrix.errors import StateError
    from servematrix.mirror.inputs import read_header

    path = tmp_path / "model.safetensors"
    _header(path, ["model.norm.weight", name])
    with pytest.raises(StateError, match="corrupt safetensors header: tensor name"):
        read_header(path)
    _header(path, ["model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
    assert set(read_header(path)) == {"model.norm.weight", "model.layers.0.mlp.up_proj.weight"}


def test_an_index_naming_a_tensor_with_a_control_character_is_refused_at_its_line(tmp_path):
    from servematrix.errors import ConfigError
    from servematrix.mirror.inputs import read_index

    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "a.safetensors",
                                                                f"x{ESC}": "a.safetensors"}}, indent=1))
    with pytest.raises(ConfigError) as err:
        read_index(path)
    assert err.value.line == 5 and "tensor name" in str(err.value), str(err.value)


def test_mirror_of_a_checkpoint_with_an_escape_in_a_tensor_name_is_one_line_naming_the_file(work, capsys):
    from tests.unit.mirror.sources import add_embeddings, dense_layers, llama_like, quantized, write_checkpoint

    tensors = add_embeddings(quantized(dense_layers(2, 128, 2, 1, 64, 256), "none", "BF16"), 300, 128, "BF16", False)
    tensors[f"model.extra{ESC}.weight"] = ("BF16", [128])
    write_checkpoint(work.root / "src", llama_like("llama", 2, 128, 2, 1, 64, 256, 300), tensors)
    check(capsys, work.tmp, ["mirror", "src", "--out", "scenarios/t.yaml"], 2,
          ["src/model.safetensors", "tensor name", "U+001B"])
    assert not (work.root / "scenarios" / "t.yaml").exists()
