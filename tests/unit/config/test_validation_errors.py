"""A malformed matrix, an unknown key, a bad value or a missing scenario: exit 2 with file:line
and the field named, and nothing runs."""

import shutil
import textwrap
from pathlib import Path

import pytest

from servematrix.cli import main
from servematrix.config.matrix import load_matrix
from servematrix.config.yamlio import ConfigError

from .test_matrix import SCENARIO


@pytest.fixture
def repo(write):
    write("scenarios/alpha.yaml", SCENARIO.format(name="alpha"))
    return write


def error_of(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_matrix(path)
    return info.value


def test_unknown_key_names_file_line_and_field(repo):
    p = repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\naxes:\n  tp: [1]\n  tensor_parallel: [2]\n")
    err = error_of(p)
    assert (err.line, err.field, err.message) == (5, "axes.tensor_parallel", "unknown field")
    assert str(err).startswith(f"{p}:5: axes.tensor_parallel: unknown field")


def test_bad_value_names_the_field(repo):
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\naxes:\n  tp: [1, two]\n"))
    assert err.line == 4 and err.field == "axes.tp.1"


def test_missing_scenario_points_at_the_reference(repo):
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios:\n  - alpha\n  - gamma\n"))
    assert (err.line, err.field) == (4, "scenarios.1")
    assert "unknown scenario 'gamma'" in err.message and "known: alpha" in err.message


def test_malformed_yaml_reports_the_line(repo):
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios: [alpha\naxes: {tp: [1]}\n"))
    assert err.line is not None and "malformed YAML" in err.message


def test_duplicate_keys_are_an_error_not_a_silent_override(repo):
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\nname: n\n"))
    assert err.line == 3 and "duplicate key 'name'" in err.message


def test_xfail_without_reason_or_bug_is_rejected(repo):
    err = error_of(repo("matrix/m.yaml", textwrap.dedent("""\
        name: m
        include:
          - scenario: alpha
            expect: xfail
    """)))
    assert err.line == 3 and err.field == "include.0"
    assert "reason and a bug (upstream URL or docs/ write-up)" in err.message


@pytest.mark.parametrize("bug, words", [
    ("docs/sweep-triage.md#no-such-heading", "docs/sweep-triage.md has no heading whose anchor is #no-such-heading"),
    ("docs/nowhere.md#a", "no write-up docs/nowhere.md in this repository"),
    ("../docs/sweep-triage.md", "neither an http(s) URL of the upstream bug nor a write-up"),
    ("https://", "is not a URL"),
])
def test_a_waivers_bug_is_an_upstream_url_or_a_write_up_whose_heading_exists(repo, bug, words):
    err = error_of(repo("matrix/m.yaml", textwrap.dedent(f"""\
        name: m
        include:
          - scenario: alpha
            expect: xfail
            reason: why
            bug: "{bug}"
    """)))
    assert err.line == 6 and err.field == "include.0.bug" and words in err.message


def test_every_waiver_in_the_shipped_matrices_links_an_upstream_issue_or_pr_or_a_write_up():
    # a source file is not a bug report: it says where, never whether upstream knows (issue #25)
    import re

    import yaml

    root = Path(__file__).resolve().parents[3]
    bugs = [(m.name, e["bug"]) for m in sorted((root / "matrix").glob("*.yaml"))
            for e in (yaml.safe_load(m.read_text()).get("include") or []) if isinstance(e, dict) and e.get("bug")]
    assert len(bugs) >= 8  # every seed bug, the PP=2 and broken-checkpoint waivers
    upstream = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+")
    assert [(m, b) for m, b in bugs if not (upstream.fullmatch(b) or b.startswith("docs/"))] == []


def test_quant_the_scenario_does_not_define_is_rejected(repo):
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\naxes:\n  quant: [nvfp4]\n"))
    assert err.field == "axes.quant" and "has no quant 'nvfp4'" in err.message


def test_errors_inside_a_scenario_file_name_that_file(repo, write):
    bad = write("scenarios/broken.yaml", SCENARIO.format(name="broken").replace("quants:", "quantz:"))
    err = error_of(repo("matrix/m.yaml", "name: m\nscenarios: [broken]\n"))
    assert err.path == str(bad) and err.field == "quantz" and err.line == 5


def test_cli_validate_exits_2_and_prints_location(repo, capsys):
    p = repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\nbogus: 1\n")
    assert main(["validate", str(p)]) == 2
    assert f"{p}:3: bogus: unknown field" in capsys.readouterr().err


def test_cli_run_on_invalid_matrix_exits_2_before_running_anything(repo, tmp_path, capsys):
    p = repo("matrix/m.yaml", "name: m\nscenarios: [nope]\n")
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out)]) == 2
    assert not out.exists()
    assert "unknown scenario 'nope'" in capsys.readouterr().err


def test_cli_list_prints_expanded_ids(repo, capsys):
    p = repo("matrix/m.yaml", "name: m\nscenarios: [alpha]\naxes: {tp: [1, 2]}\n")
    assert main(["list", str(p)]) == 0
    assert capsys.readouterr().out.split() == ["alpha/tp1-pp1-fp32", "alpha/tp2-pp1-fp32"]


# --- trust at the boundary: every bad input is exit 2, one located line, nothing written ---------
# Each case edits one shipped file (in a copy of matrix/, scenarios/ and references/) and validates
# the matrix that uses it through the CLI. The line expected is the line of the edit.
REPO = Path(__file__).resolve().parents[3]
BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9 if i else ["x"] * 9) + "]\n" for i in range(7))
HUGE = "9" * 5000


def _replace(old: str, new: str | bytes):
    """Replace the first `old` by `new` (bytes: written as they are, not as UTF-8)."""
    def edit(raw: bytes) -> bytes:
        assert old.encode() in raw, old
        return raw.replace(old.encode(), new if isinstance(new, bytes) else new.encode(), 1)

    return edit, old


def _append(text: str):
    return (lambda raw: raw + text.encode()), None  # the edit starts after the last line


def _raw(func):
    return func, ""  # the edit starts on the first line


# (id, file edited, edit, matrix validated (None: the file edited), field named (None: the file as a
# whole), part of the message, line: lines below the edit's first line, or None for no line)
CASES = [
    # bytes and YAML structure (yamlio.load_yaml)
    ("latin-1", "matrix/cpu-smoke.yaml", _replace("description: tiny", b"description: caf\xe9 tiny"), None, None,
     "not UTF-8", 0),
    ("utf-16", "matrix/cpu-smoke.yaml", _raw(lambda raw: raw.decode().encode("utf-16")), None, None, "not UTF-8", 0),
    ("control char", "matrix/cpu-smoke.yaml", _replace("description: tiny", "description: ti\x01ny"), None, None,
     "control character U+0001", 0),
    ("NUL", "scenarios/tiny-llama.yaml", _replace("tags: [forged", "tags: [for\x00ged"), "matrix/cpu-smoke.yaml",
     None, "control character U+0000", 0),
    ("self alias", "matrix/cpu-smoke.yaml",
     _replace("scenarios: [tiny-llama, tiny-llama-2kv]", "scenarios: &s [tiny-llama, *s]"), None, None,
     "recursive", 0),
    ("alias bomb", "matrix/cpu-smoke.yaml", _append(BOMB), None, None, "more than 100000 values", 5),
    ("deep nesting", "matrix/cpu-smoke.yaml", _append("deep: " + "[" * 200 + "]" * 200 + "\n"), None, None,
     "nested deeper than 32 levels", 0),
    ("5000-digit int", "matrix/cpu-smoke.yaml", _replace("tp: [1, 2]", f"tp: [1, {HUGE}]"), None, None,
     "cannot read this value", 0),
    ("month 13", "matrix/cpu-smoke.yaml", _replace("name: cpu-smoke", "name: 2001-13-45"), None, None,
     "cannot read this value", 0),
    ("mapping as list", "matrix/cpu-smoke.yaml", _replace("axes:\n  tp: [1, 2]\n  pp: [1]\n  quant: [fp32]",
                                                          "axes: [1, 2]"), None, "axes", "valid dictionary", 0),
    ("file is a list", "scenarios/tiny-llama.yaml", _raw(lambda raw: b"- 1\n- 2\n"), "matrix/cpu-smoke.yaml",
     None, "valid dictionary", 0),
    ("too large", "matrix/cpu-smoke.yaml", _append("#" * (1 << 20) + "\n"), None, None, "larger than 1048576 bytes",
     None),
    # matrix fields
    ("bad signature regex", "matrix/cpu-smoke.yaml",
     _replace('signature: "intermediate_tensors"', 'signature: "intermediate_(tensors"'), None,
     "include.0.signature", "not a valid regular expression", 0),
    ("tp 1000000000", "matrix/cpu-smoke.yaml", _replace("tp: [1, 2]", "tp: [1, 1000000000]"), None, "axes.tp.1",
     "less than or equal to 1024", 0),
    ("tp true", "matrix/cpu-smoke.yaml", _replace("tp: [1, 2]", "tp: [true]"), None, "axes.tp.0",
     "valid integer", 0),
    ("tp 1.5", "matrix/cpu-smoke.yaml", _replace("tp: [1, 2]", "tp: [1.5]"), None, "axes.tp.0", "valid integer", 0),
    ("tp x pp", "matrix/cpu-smoke.yaml", _replace("tp: [1, 2]\n  pp: [1]", "tp: [1024]\n  pp: [2]"), None,
     "axes.tp", "2048 ranks, more than 1024", 0),
    ("include tp 0", "matrix/cpu-smoke.yaml", _replace("    tp: 1\n    pp: 2", "    tp: 0\n    pp: 2"), None,
     "include.0.tp", "greater than or equal to 1", 0),
    ("quant []", "matrix/cpu-smoke.yaml", _replace("quant: [fp32]", "quant: []"), None, "axes.quant",
     "at least 1 item", 0),
    ("device tpu", "matrix/gpu-smoke.yaml", _replace("device: [gpu]", "device: [tpu]"), None, "axes.device.0",
     "unknown device 'tpu'", 0),
    ("include device tpu", "matrix/cpu-smoke.yaml", _replace("{scenario: smollm2-135m, tp: 1}",
                                                             "{scenario: smollm2-135m, tp: 1, device: tpu}"),
     None, "include.1.device", "unknown device 'tpu'", 0),
    ("vllm release", "matrix/cpu-smoke.yaml", _replace("quant: [fp32]", "quant: [fp32]\n  vllm: [cpu-9.9]"), None,
     "axes.vllm.0", "unknown vLLM release 'cpu-9.9'", 1),
    ("reason with newline", "matrix/cpu-smoke.yaml", _replace("reason: >-", "reason: |-"),
     None, "include.0.reason", "one line", 0),
    ("nan timeout", "matrix/cpu-smoke.yaml", _replace("scenarios: [tiny", "startup_timeout: .nan\nscenarios: [tiny"),
     None, "startup_timeout", "finite number", 0),
    ("inf timeout", "matrix/cpu-smoke.yaml", _replace("scenarios: [tiny", "startup_timeout: .inf\nscenarios: [tiny"),
     None, "startup_timeout", "finite number", 0),
    ("gsm8k limit 0", "matrix/cpu-smoke.yaml", _append("gsm8k: {limit: 0}\n"), None, "gsm8k.limit",
     "greater than or equal to 1", 0),
    ("gsm8k limit over the test set", "matrix/cpu-smoke.yaml", _append("gsm8k: {limit: 5000}\n"), None,
     "gsm8k.limit", "less than or equal to 1319", 0),
    ("axes 20000 entries", "matrix/cpu-smoke.yaml",
     _replace("tp: [1, 2]", "tp: [" + ", ".join(map(str, range(1, 101))) + "]\n  vllm: [current"
              + ", current" * 99 + "]"),
     None, "axes", "more than 10000", -1),
    ("unknown scenario name with a slash", "matrix/cpu-smoke.yaml",
     _replace("scenarios: [tiny-llama,", "scenarios: [../tiny-llama,"), None, "scenarios.0", "pattern", 0),
    # scenario fields
    ("bad smoke regex", "scenarios/smollm2-135m.yaml", _replace('regex: "\\\\b4\\\\b"', 'regex: "(4"'),
     "matrix/cpu-smoke.yaml", "smoke.prompts.1.expect.regex", "not a valid regular expression", 0),
    ("hidden_size 1e9", "scenarios/tiny-llama.yaml", _replace("hidden_size: 128", "hidden_size: 1e9"),
     "matrix/cpu-smoke.yaml", "model.forge.config.hidden_size", "whole number in 1..65536", 0),
    ("hidden_size 1000000000", "scenarios/tiny-llama.yaml", _replace("hidden_size: 128", "hidden_size: 1000000000"),
     "matrix/cpu-smoke.yaml", "model.forge.config.hidden_size", "whole number in 1..65536", 0),
    ("num_hidden_layers -1", "scenarios/tiny-llama.yaml", _replace("num_hidden_layers: 2", "num_hidden_layers: -1"),
     "matrix/cpu-smoke.yaml", "model.forge.config.num_hidden_layers", "whole number in 1..1024", 0),
    ("no hidden_size", "scenarios/tiny-llama.yaml", _replace("      hidden_size: 128\n", ""), "matrix/cpu-smoke.yaml",
     "model.forge.config", "full-size model", -1),
    ("forge estimate", "scenarios/tiny-llama.yaml", _replace("hidden_size: 128", "hidden_size: 65536"),
     "matrix/cpu-smoke.yaml", "model.forge.config.hidden_size", "limit of 250,000,000", 0),
    ("experts estimate", "scenarios/tiny-minimax-m2.yaml", _replace("num_local_experts: 4", "num_local_experts: 4000"),
     "matrix/seed-bugs.yaml", "model.forge.config.num_local_experts", "parameters", 0),
    ("extra tensor estimate", "scenarios/tiny-minimax-m2-kvscale.yaml",
     _replace('k_proj.k_scale", value: 1.0}', 'k_proj.k_scale", value: 1.0, shape: [1000000, 1000]}'),
     "matrix/seed-bugs.yaml", "model.forge.extra_tensors.0.shape", "parameters", 0),
    ("tokenizer vocab", "scenarios/tiny-llama.yaml", _replace("vocab_size: 1024", "vocab_size: 1000000000"),
     "matrix/cpu-smoke.yaml", "model.forge.tokenizer.vocab_size", "less than or equal to 65536", 0),
    ("forge model_type path", "scenarios/tiny-llama.yaml", _replace("model_type: llama", "model_type: ../evil"),
     "matrix/cpu-smoke.yaml", "model.forge.model_type", "pattern", 0),
    ("forge seed -1", "scenarios/tiny-llama.yaml", _replace("seed: 0", "seed: -1"), "matrix/cpu-smoke.yaml",
     "model.forge.seed", "greater than or equal to 0", 0),
    ("fp8 block 0", "scenarios/tiny-glm-5.1-dsa.yaml", _replace("block: [128, 128]", "block: [0, 128]"),
     "matrix/seed-bugs.yaml", "model.forge.fp8_blocks.0.block.0", "greater than or equal to 1", 0),
    ("forge config date", "scenarios/tiny-llama.yaml", _replace("head_dim: 64", "head_dim: 64\n      when: 2020-01-01"),
     "matrix/cpu-smoke.yaml", "model.forge.config.when", "JSON", 1),
    ("gguf file outside", "scenarios/smollm2-135m.yaml", _replace("file: SmolLM2", "file: ../../SmolLM2"),
     "matrix/cpu-smoke.yaml", "model.gguf.file", "inside the package", 0),
    ("gguf dtype", "scenarios/smollm2-135m.yaml", _replace("    dtype: float32", "    dtype: load"),
     "matrix/cpu-smoke.yaml", "model.gguf.dtype", "'float32'", 0),
    ("hf id", "scenarios/qwen3-0.6b.yaml", _replace("hf: Qwen/Qwen3-0.6B", "hf: Qwen//Qwen3"),
     "matrix/nightly-gpu.yaml", "model.hf", "Hugging Face repo id", 0),
    ("bad env key", "scenarios/tiny-llama.yaml", _replace("  startup_timeout: 600", '  env: {"BAD-KEY": "1"}'),
     "matrix/cpu-smoke.yaml", "server.env.BAD-KEY", "pattern", 0),
    ("env value with newline", "scenarios/tiny-llama.yaml",
     _replace("  startup_timeout: 600", '  env: {A: "x\\ny"}'), "matrix/cpu-smoke.yaml", "server.env.A",
     "line break", 0),
    ("quant env key", "scenarios/tiny-llama.yaml", _replace("fp32: {args: [--dtype, float32]}",
                                                             'fp32: {args: [--dtype, float32], env: {"1X": "1"}}'),
     "matrix/cpu-smoke.yaml", "quants.fp32.env.1X", "pattern", 0),
    ("NUL in an argument", "scenarios/tiny-llama.yaml", _replace('"2048", --max-num-seqs', '"2048\\0", --max-num-seqs'),
     "matrix/cpu-smoke.yaml", "server.args.2", "NUL", 0),
    ("startup timeout 0", "scenarios/tiny-llama.yaml", _replace("startup_timeout: 600", "startup_timeout: 0"),
     "matrix/cpu-smoke.yaml", "server.startup_timeout", "greater than or equal to 1", 0),
    ("startup timeout true", "scenarios/tiny-llama.yaml", _replace("startup_timeout: 600", "startup_timeout: true"),
     "matrix/cpu-smoke.yaml", "server.startup_timeout", "valid number", 0),
    ("gsm8k timeout inf", "scenarios/tiny-llama.yaml",
     _replace("num_concurrent: 2", "num_concurrent: 2\n  timeout: .inf"),
     "matrix/cpu-smoke.yaml", "gsm8k.timeout", "finite number", 1),
    ("scenario gsm8k limit", "scenarios/tiny-llama.yaml", _replace("limit: 8 ", "limit: 100000 "),
     "matrix/cpu-smoke.yaml", "gsm8k.limit", "less than or equal to 1319", 0),
    ("max_tokens huge", "scenarios/tiny-llama.yaml", _replace("max_tokens: 16", "max_tokens: 1000000000"),
     "matrix/cpu-smoke.yaml", "smoke.prompts.0.max_tokens", "less than or equal to 32768", 0),
    ("min_tokens above max_tokens", "scenarios/tiny-llama.yaml",
     _replace("max_tokens: 16\n      expect: {min_tokens: 1}", "max_tokens: 16\n      expect: {min_tokens: 17}"),
     "matrix/cpu-smoke.yaml", "smoke.prompts.0.expect.min_tokens", "can never be met", 1),
    ("duplicate prompt name", "scenarios/tiny-llama.yaml", _replace("name: short-prompt", "name: completion"),
     "matrix/cpu-smoke.yaml", "smoke.prompts.1.name", "duplicate prompt name", 0),
    ("chat role", "scenarios/tiny-llama.yaml", _replace("role: user", "role: robot"), "matrix/cpu-smoke.yaml",
     "smoke.prompts.2.messages.0.role", "'user'", 0),
    ("empty messages", "scenarios/tiny-llama.yaml",
     _replace('messages: [{role: user, content: "What is 2+2?"}]', "messages: []"), "matrix/cpu-smoke.yaml",
     "smoke.prompts.2.messages", "at least 1 item", 0),
    ("baseline quant", "scenarios/tiny-llama.yaml",
     _replace("parity: {top_k: 5}", "parity: {top_k: 5, baseline_quant: bf16}"),
     "matrix/cpu-smoke.yaml", "smoke.parity.baseline_quant", "no quant 'bf16'", 0),
    ("load_check device", "scenarios/tiny-glm-5.1-dsa.yaml", _replace("devices: [cpu]", "devices: [tpu]"),
     "matrix/seed-bugs.yaml", "load_check.devices.0", "unknown device 'tpu'", 0),
    ("load_check reason", "scenarios/tiny-glm-5.1-dsa.yaml",
     _replace('reason: "sparse MLA', 'reason: "two\\nlines sparse MLA'),
     "matrix/seed-bugs.yaml", "load_check.reason", "one line", 0),
    ("gpu capability nan", "scenarios/qwen3-0.6b.yaml", _replace("gpu_capability: 8.9", "gpu_capability: .nan"),
     "matrix/nightly-gpu.yaml", "quants.fp8.requires.gpu_capability", "finite number", 0),
    ("effect nan", "scenarios/smollm2-135m.yaml", _replace("effect: 0.25", "effect: .nan"), "matrix/cpu-smoke.yaml",
     "accuracy.checks.0.effect", "finite number", 0),
    ("proportion effect 2", "scenarios/smollm2-135m.yaml", _replace("effect: 0.15}", "effect: 2}"),
     "matrix/cpu-smoke.yaml",
     "accuracy.checks.1.effect", "below 1", 0),
    ("quant name", "scenarios/tiny-llama.yaml", _replace("  fp32: {args", "  FP 32: {args"), "matrix/cpu-smoke.yaml",
     "quants.FP 32", "pattern", 0),
    ("tag with a comma", "scenarios/tiny-llama.yaml", _replace("tags: [forged,", 'tags: ["a,b", forged,'),
     "matrix/cpu-smoke.yaml", "tags.0", "pattern", 0),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("file, edit, matrix, field, message, line",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_a_bad_value_is_exit_2_with_one_line_naming_file_line_and_field_and_nothing_is_written(
        tmp_path, monkeypatch, capsys, file, edit, matrix, field, message, line):
    root = tmp_path / "repo"
    for d in ("matrix", "scenarios", "references"):
        shutil.copytree(REPO / d, root / d)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(cache))
    func, old = edit
    target = root / file
    original = target.read_bytes()
    target.write_bytes(func(original))
    if line is not None:  # below the line the edit starts on: where `old` was, or the first appended
        start = len(original) if old is None else original.index(old.encode())
        line += original.count(b"\n", 0, start) + 1
    before = _tree(tmp_path)

    assert main(["validate", str(root / (matrix or file))]) == 2

    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    where = f"{target}:{line}: " if line else f"{target}: "
    assert err.startswith(f"error: {where}{field + ': ' if field else ''}"), err
    assert message in err and "internal error" not in err
    assert _tree(tmp_path) == before and not cache.exists()


def test_the_shipped_files_still_validate_and_write_nothing(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SERVEMATRIX_CACHE", str(cache))
    files = sorted(str(p) for p in (REPO / "matrix").glob("*.yaml"))
    assert main(["validate", *files]) == 0
    assert main(["list", *files]) == 0
    assert capsys.readouterr().err == "" and not cache.exists()


def test_an_alias_to_a_complete_node_and_a_merge_key_still_load(write):
    from servematrix.config.yamlio import load_yaml

    p = write("m.yaml", "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\nagain: *b\n")
    assert load_yaml(p).data == {"base": {"x": 1, "y": 2}, "use": {"x": 1, "y": 3}, "again": {"x": 1, "y": 2}}
