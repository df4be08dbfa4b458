"""A malformed matrix, an unknown key, a bad value or a missing scenario: exit 2 with file:line
and the field named, and nothing runs."""

import textwrap

import pytest

from servematrix.cli import main
from servematrix.matrix import load_matrix
from servematrix.yamlio import ConfigError

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
    assert "reason and a bug URL" in err.message


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
