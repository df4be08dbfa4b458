"""No secret VALUE leaves servematrix, on a real run: the broken checkpoint (vLLM dies in weight
loading, ~30 s) served with secrets in the runner's environment (HF_TOKEN, a secret-named
variable), in the server's args (--api-key with two keys, --hf-token, a URL password inside
--allowed-origins, which vLLM logs as it is) and as URL passwords in non-secret-named variables of
the scenario's server.env; long values and SHORT ones (4 characters,
which the old redactor never masked). Every file of the run directory, the history database, every
line the CLI printed and what `repro` / `repro --compose` print are searched for each value."""

import json
import re
import secrets
import string
import textwrap

import pytest
import yaml

from .conftest import REPO, servematrix

pytestmark = pytest.mark.integration
SIGNATURE = "RuntimeError: start (0) + length (128) exceeds dimension size (64)."
ID = "tiny-llama-broken/tp1-pp1-fp32"


def _short() -> str:
    # letters and digits only: a 4-character value is masked (and searched for) as a whole token
    return "".join(secrets.choice(string.ascii_letters) for _ in range(2)) + "".join(
        secrets.choice(string.digits) for _ in range(2))


@pytest.fixture(scope="module")
def values():
    return {
        "hf_token_env": "hf_" + secrets.token_hex(16),
        "secret_env_short": _short(),
        "api_key_long": "sk-" + secrets.token_hex(16),
        "api_key_short": _short(),
        "hf_token_arg": "hf_" + secrets.token_hex(12),
        "url_password": "pw" + secrets.token_hex(8),
        "url_password_short": _short(),
        "origin_password": "op" + secrets.token_hex(8),
    }


def leaks(text: str, values: dict) -> list[str]:
    """The secrets found in `text`: a long value anywhere, a short one as a whole token (the
    redactor's rule, so a random 4-character string inside an unrelated word is no finding)."""
    found = []
    for name, v in values.items():
        pattern = re.escape(v) if len(v) >= 6 else rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])"
        if re.search(pattern, text):
            found.append(name)
    return found


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, shared_cache, values):
    tmp = tmp_path_factory.mktemp("secrets")
    scenario = yaml.safe_load((REPO / "scenarios" / "tiny-llama-broken.yaml").read_text())
    scenario["server"]["args"] += ["--api-key", values["api_key_long"], values["api_key_short"],
                                   "--hf-token", values["hf_token_arg"],
                                   # vLLM masks api_key and hf_token in its own log line of its
                                   # non-default args, but not this: servematrix's log pump must
                                   "--allowed-origins", json.dumps([f"https://viewer:{values['origin_password']}@dash.invalid"])]
    scenario["server"]["env"] = {
        "PIP_INDEX_URL": f"https://ci-bot:{values['url_password']}@pypi.invalid/simple",
        "MIRROR_URL": f"https://mirror:{values['url_password_short']}@mirror.invalid/",
    }
    (tmp / "scenarios").mkdir()
    (tmp / "scenarios" / "tiny-llama-broken.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    matrix = tmp / "m.yaml"
    matrix.write_text(textwrap.dedent(f"""\
        name: secrets
        scenario_dir: {tmp / 'scenarios'}
        scenarios: [tiny-llama-broken]
        startup_timeout: 900
    """))
    env = {"SERVEMATRIX_CACHE": shared_cache, "HF_TOKEN": values["hf_token_env"],
           "SERVICE_PASSWORD": values["secret_env_short"]}
    out = tmp / "runs" / "run"
    run = servematrix("run", str(matrix), "--out", str(out), env=env)
    repro = servematrix("repro", ID, "--matrix", str(matrix), env=env)
    compose = servematrix("repro", ID, "--matrix", str(matrix), "--compose", env=env)
    return out, run, repro, compose


def test_a_broken_checkpoint_expected_to_pass_fails_at_once_with_its_signature_and_exits_1(secret_run):
    """(Also the load-failure case of test_load_failure.py: the same server start serves both.)"""
    out, run, _, _ = secret_run
    assert run.returncode == 1, run.stdout + run.stderr
    (r,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert r["verdict"] == "fail" and r["load"]["ok"] is False
    assert r["failure"] == {"kind": "exception", "signature": SIGNATURE, "infra": False, "phase": "load"}
    # declared dead when the process exited, far inside the 900 s start-up timeout
    assert r["load"]["seconds"] < 300
    assert SIGNATURE in (out / "load-success.md").read_text()


def test_no_file_of_the_run_and_no_history_row_holds_a_secret(secret_run, values):
    out, _, _, _ = secret_run
    files = [p for p in out.rglob("*") if p.is_file()] + [out.parent / "history.sqlite"]
    assert out / ID / "server.log" in files and (out.parent / "history.sqlite").is_file()
    found = {str(p.relative_to(out.parent)): leaks(p.read_bytes().decode("latin-1"), values) for p in files}
    assert not {k: v for k, v in found.items() if v}


def test_the_secrets_were_there_to_leak_and_are_masked_where_they_were(secret_run):
    """The command line is there with each secret masked, and vLLM's own line of its non-default
    args holds the origin URL with its password masked: redaction kept it out, not silence."""
    out, _, _, _ = secret_run
    log = (out / ID / "server.log").read_text()
    first = log.splitlines()[0]
    assert "--api-key '***' '***'" in first and "--hf-token '***'" in first and "HF_TOKEN" not in first
    assert "PIP_INDEX_URL='https://ci-bot:***@pypi.invalid/simple'" in first
    (args,) = [line for line in log.splitlines() if "non-default args:" in line]
    assert "'allowed_origins': ['https://viewer:***@dash.invalid']" in args and "'api_key': '***'" in args
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenarios"][0]["server_command"] == first.removeprefix("# servematrix: ")


def test_nothing_the_cli_printed_holds_a_secret(secret_run, values):
    _, run, repro, compose = secret_run
    assert repro.returncode == 0 and compose.returncode == 0, repro.stderr + compose.stderr
    assert "--api-key '***' '***'" in repro.stdout and "docker compose" in compose.stdout
    for name, proc in (("run", run), ("repro", repro), ("repro --compose", compose)):
        assert not leaks(proc.stdout + proc.stderr, values), name
