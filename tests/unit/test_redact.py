"""What is secret is decided in servematrix/redact.py, and masked by VALUE: secret-named variables'
values of any length, credential flags' values in an argv or a printed command, URL passwords,
values registered by a launch spec, each wherever else it appears; printed commands are quoted
word by word and comments stay on one line. Each rule has a case the old secrets.py (names only,
six characters and more) let through."""

import json
import subprocess
import sys

import pytest

from servematrix import redact
from servematrix.errors import ConfigError

MASK = "***"


@pytest.fixture(autouse=True)
def _no_registered_secrets():
    redact.forget()
    yield
    redact.forget()


# (a) secret-named variables, any length ---------------------------------------------------------
def test_a_short_value_of_a_secret_named_variable_is_masked():
    assert redact.redact_text("token=ab12 sent", {"HF_TOKEN": "ab12"}) == "token=*** sent"


def test_a_short_value_is_masked_only_as_a_whole_token():
    env = {"MY_PASSWORD": "q7"}
    assert redact.redact_text("pw 'q7', q7.", env) == "pw '***', ***."
    assert redact.redact_text("aq7 q7b q77 7q7", env) == "aq7 q7b q77 7q7"  # inside a word: not the secret


def test_a_long_value_is_masked_even_inside_a_longer_word():
    assert redact.redact_text("Bearerhf_abcdefgh%0A", {"HF_TOKEN": "hf_abcdefgh"}) == "Bearer***%0A"


def test_switches_and_look_alike_names_are_not_secrets_so_reports_stay_valid_json():
    env = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "TOKENIZERS_PARALLELISM": "false", "GIT_AUTHOR_NAME": "Ann",
           "VLLM_MAX_TOKENS": "8"}
    text = json.dumps({"ok": False, "tp": 1, "by": "Ann", "n": 8})
    assert redact.redact_text(text, env) == text
    assert redact.is_secret("HF_TOKEN") and redact.is_secret("OPENAI_API_KEY") and redact.is_secret("AUTH_HEADER")
    assert not redact.is_secret("TOKENIZERS_PARALLELISM")


def test_redact_env_masks_secret_names_and_the_secrets_inside_other_values():
    env = {"HF_TOKEN": "hf1", "MIRROR_URL": "https://me:pw99@mirror/simple", "NOTE": "token hf1 and pw99"}
    assert redact.redact_env(env) == {"HF_TOKEN": MASK, "MIRROR_URL": "https://me:***@mirror/simple",
                               "NOTE": "token *** and ***"}


def test_a_value_is_masked_also_as_the_json_and_html_reports_escape_it():
    import html

    env = {"DB_PASSWORD": 'p"w<9\\x'}
    text = json.dumps({"note": 'dsn p"w<9\\x'}) + " " + html.escape('p"w<9\\x')
    assert redact.redact_text(text, env) == '{"note": "dsn ***"} ***'


# (b) credential flags in an argv, and in text ---------------------------------------------------
def test_the_values_of_credential_flags_are_masked_in_an_argv():
    argv = ["python", "-m", "vllm", "--api-key", "k1", "sk-second-key", "--model", "/m", "--hf-token=hf_x",
            "--token", "abc", "--password", "--port", "8000", "--api_key=z9"]
    assert redact.redact_argv(argv, {}) == ["python", "-m", "vllm", "--api-key", MASK, MASK, "--model", "/m",
                                     f"--hf-token={MASK}", "--token", MASK, "--password", "--port", "8000",
                                     f"--api_key={MASK}"]


def test_a_flag_value_is_masked_in_every_other_word_of_the_argv_too():
    argv = ["x", "--served-model-name", "tenant-sk-live-9876", "--api-key", "sk-live-9876"]
    assert redact.redact_argv(argv, {}) == ["x", "--served-model-name", "tenant-***", "--api-key", MASK]


def test_credential_flags_in_free_text_are_masked_with_their_other_occurrences():
    text = "$ vllm --api-key 'k 3x' --hf-token=hf_q\nkey was k 3x, token hf_q"
    assert redact.redact_text(text, {}) == "$ vllm --api-key '***' --hf-token=***\nkey was ***, token ***"
    usage = "[--api-key API_KEY [API_KEY ...]] [--hf-token [HF_TOKEN]]"
    assert redact.redact_text(usage, {}) == usage  # the flag's own metavar is not a secret


# (c) URL passwords ----------------------------------------------------------------------------
def test_a_urls_password_is_masked_keeping_user_and_host():
    assert (redact.redact_text("pip -i https://ci-bot:Zx9@pypi.example/simple", {})
            == "pip -i https://ci-bot:***@pypi.example/simple")
    assert redact.redact_text("git+ssh://git@host/repo and mailto:a@b", {}) == "git+ssh://git@host/repo and mailto:a@b"
    assert redact.redact_text("https://u:p@ss@h/", {}) == "https://u:***@h/"


# (d) a known secret is masked everywhere ------------------------------------------------------
def test_a_url_password_is_masked_wherever_else_it_appears_in_the_text():
    assert (redact.redact_text("MIRROR_URL=https://u:hunter2@m/ echo hunter2", {})
            == "MIRROR_URL=https://u:***@m/ echo ***")


def test_registered_values_are_masked_in_any_later_text():
    redact.remember_launch(["vllm", "--api-key", "Kq4"], {"MIRROR": "https://u:pw7Z@m/", "HF_TOKEN": "hf_reg"})
    assert redact.redact_text("non-default args: {'api_key': ['Kq4']} pw7Z hf_reg", {}) == \
        "non-default args: {'api_key': ['***']} *** ***"
    redact.forget()
    assert redact.redact_text("Kq4", {}) == "Kq4"


# printing safely ------------------------------------------------------------------------------
def test_a_printed_command_runs_exactly_its_words_with_secrets_masked_and_quoted():
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a;b", "$(touch /tmp/no)", "*",
            "--api-key", "sk-secret-value"]
    line = redact.shell_command(argv, {"X": "1 2; echo injected", "HF_TOKEN": "hf_abc"})
    assert "sk-secret-value" not in line and "hf_abc" not in line
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True).stdout
    assert out.strip() == str(["a;b", "$(touch /tmp/no)", "*", "--api-key", MASK])


def test_an_environment_name_that_is_not_a_variable_name_is_refused():
    for bad in ("A;rm -rf ~", "1X", "A B", "A=B", "", "Ä"):
        with pytest.raises(ConfigError):
            redact.shell_command(["true"], {bad: "1"})
    assert redact.shell_command(["true"], {"_Ok9": "1"}) == "_Ok9=1 true"


def test_a_comment_cannot_leave_its_line():
    text = redact.one_line("xfail — reason\nrm -rf ~\r\x1b[2K\u2028echo pwned token sk-abcdefgh")
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text
    assert text.startswith("xfail — reason rm -rf ~")


# a child's output -----------------------------------------------------------------------------
def test_a_secret_split_across_chunks_is_masked_whole(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_splitsecret")
    lines = redact.LineRedactor()
    out = lines.feed(b"loading with hf_spl") + lines.feed(b"itsecret\nnext hf_split") + lines.flush()
    assert out == b"loading with ***\nnext hf_split"


def test_bytes_that_are_not_utf8_pass_through_unchanged():
    assert redact.redact_bytes(b"\xff\xfe key=ab12 \xc3", {"API_KEY": "ab12"}) == b"\xff\xfe key=*** \xc3"


def test_lm_evals_command_and_log_are_written_through_the_redactor(tmp_path, monkeypatch):
    """gsm8k.run writes command.txt and lm_eval.log itself: a fake 'python' stands in for lm-eval."""
    from servematrix.check import gsm8k
    from servematrix.config.scenario import Gsm8kSpec

    monkeypatch.setenv("OPENAI_API_KEY", "sk-lmeval-0001")
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"calling with $OPENAI_API_KEY\"\necho 'RuntimeError: sk-lmeval-0001'\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "gsm8k"
    with pytest.raises(gsm8k.Gsm8kFailed) as info:
        gsm8k.run("http://u:pw3@127.0.0.1:1", "m", Gsm8kSpec(), 1, out, lambda: True, python=str(fake))
    log, cmd = (out / "lm_eval.log").read_text(), (out / "command.txt").read_text()
    assert "sk-lmeval-0001" not in log + cmd + str(info.value) and "calling with ***" in log
    assert "pw3" not in cmd and "base_url=http://u:***@127.0.0.1:1/v1/completions" in cmd


# what `servematrix repro` prints ------------------------------------------------------------------
def _secret_matrix(tmp_path):
    import yaml

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    scenario = yaml.safe_load((root / "scenarios" / "tiny-llama-broken.yaml").read_text())
    scenario["server"]["args"] += ["--api-key", "sk-repro-4242", "Rk3"]
    scenario["server"]["env"] = {"MIRROR_URL": "https://me:Mp7@mirror.test/"}
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "tiny-llama-broken.yaml").write_text(yaml.safe_dump(scenario))
    (tmp_path / "m.yaml").write_text(f"name: m\nscenario_dir: {tmp_path / 'scenarios'}\nscenarios: [tiny-llama-broken]\n")
    return tmp_path / "m.yaml"


def test_repro_prints_comments_on_one_line_and_commands_that_run_only_their_words(tmp_path, monkeypatch, capsys):
    """Even an expectation that escaped validation with a newline in its reason prints as one
    comment line: pasting the output into bash runs the two commands and nothing else."""
    from servematrix import cli
    from servematrix.checkpoint import resolve as model
    from servematrix.config.matrix import Expectation

    from servematrix.cli import run_commands

    find = run_commands._find_entry

    def with_bad_reason(entry_id, matrix_path):
        m, e = find(entry_id, matrix_path)
        bad = Expectation.model_construct(expect="xfail", reason=f"engine dies\ntouch {tmp_path}/pwned #",
                                          bug="https://example.test/1", signature=None, strict=True)
        return m, e.model_copy(update={"expectation": bad})

    monkeypatch.setattr(model, "resolve", lambda scenario, store, **kw: "/ckpt/with space")
    monkeypatch.setattr(run_commands, "_find_entry", with_bad_reason)
    assert cli.main(["repro", "tiny-llama-broken/tp1-pp1-fp32", "--matrix", str(_secret_matrix(tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert not [s for s in ("sk-repro-4242", "Rk3", "Mp7") if s in printed], printed
    assert "# expect: xfail — engine dies touch" in printed
    shadows = "python() { echo \"RAN python $*\"; }; servematrix() { echo \"RAN servematrix $*\"; }\n"
    ran = subprocess.run(["bash", "-c", shadows + printed], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert len(lines) == 3 and all(x.startswith("RAN ") for x in lines), ran.stdout
    assert "--api-key *** ***" in lines[0] and not (tmp_path / "pwned").exists()


def test_repro_compose_masks_the_credentials_given_in_server_args(tmp_path, monkeypatch, capsys):
    import shlex

    from servematrix import cli

    from servematrix.checkpoint import resolve as model

    monkeypatch.setattr(model, "resolve", lambda scenario, store, **kw: "/ckpt")
    assert cli.main(["repro", "tiny-llama-broken/tp1-pp1-fp32", "--matrix", str(_secret_matrix(tmp_path)),
                     "--compose"]) == 0
    printed = capsys.readouterr().out
    assert "sk-repro-4242" not in printed and "Rk3" not in printed
    words = shlex.split(printed.splitlines()[1])
    env = dict(w.split("=", 1) for w in words[:words.index("docker")])
    assert shlex.split(env["SERVER_ARGS"])[-3:] == ["--api-key", "***", "***"]


def test_a_variable_that_describes_a_credential_is_not_one_and_keys_keep_their_words():
    # seen for real: Ray sets RAY_AUTH_MODE=token in its workers, and masking "token" as a whole
    # word turned every "token_ids" key of summary.json into "***_ids"
    from servematrix.redact import is_secret, redact_text

    env = {"RAY_AUTH_MODE": "token", "HF_TOKEN_PATH": "/root/.cache/hf/token", "SSH_AUTH_SOCK": "/tmp/agent.1",
           "RAY_AUTH_TOKEN": "ab12"}
    assert not any(is_secret(k) for k in ("RAY_AUTH_MODE", "HF_TOKEN_PATH", "SSH_AUTH_SOCK"))
    assert is_secret("RAY_AUTH_TOKEN") and is_secret("HF_TOKEN")
    text = '{"token_ids": [1, 2], "path": "/root/.cache/hf/token", "key": "ab12", "id": "ab12_x"}'
    out = redact_text(text, env)
    assert '"token_ids"' in out and "/root/.cache/hf/token" in out
    assert '"key": "***"' in out and '"ab12_x"' in out  # a short secret only as a whole word


# --- values read from files, printed: redact.terminal ---------------------------------------------
def test_terminal_shows_control_characters_escape_sequences_and_bidi_overrides_escaped():
    shown = redact.terminal("a\x1b[2Jb\nc\r\x07\u202ed\u2028e")
    assert shown == "a\\x1b[2Jb\\nc\\r\\x07\\u202ed\\u2028e"
    assert redact.terminal("plain id/tp1-pp1-fp32 ünïcode") == "plain id/tp1-pp1-fp32 ünïcode"


def test_terminal_bounds_a_value_keeping_its_start_and_end():
    shown = redact.terminal("start" + "x" * 1_000_000 + "end", 40)
    assert len(shown) == 40 and shown.startswith("start") and shown.endswith("end") and "…" in shown
    assert redact.column_width(["a" * 10, "b" * 1_000_000], least=8) == redact.MAX_FIELD


def test_terminal_masks_a_secret_before_cutting_it_so_no_half_of_it_is_shown():
    secret = "s3cr3tvalue99"
    redact.remember([secret])
    shown = redact.terminal("x" * 30 + secret + "y" * 100, 60)
    assert "s3cr3t" not in shown and "value99" not in shown and "***" in shown


def test_an_assignment_to_a_secret_name_in_text_is_masked_but_not_a_json_key_or_a_log_field():
    assert redact.redact_text("got 'HF_TOKEN=hf_abc123xyz' and API_KEY=\"k k\"", {}) == \
        "got 'HF_TOKEN=***' and API_KEY=\"***\""
    text = 'prompt_token_ids=[1, 2] "token_ids": [3] max_tokens=16 HF_HUB_DISABLE_IMPLICIT_TOKEN=1'
    assert redact.redact_text(text, {}) == text


def test_a_scenario_registers_its_credentials_when_it_is_read(write):
    from servematrix.config.scenario import ScenarioStore

    path = write("scenarios/s.yaml", "name: s\nmodel: {path: /x}\nserver:\n  env: {MY_API_KEY: k3yvalue42}\n"
                                     "  args: [--hf-token, t0kenvalue7]\nquants: {fp32: {}}\n"
                                     "smoke: {prompts: [{name: p, prompt: hi}]}\n")
    text = "reason: k3yvalue42 and t0kenvalue7"
    assert redact.redact_text(text, {}) == text  # nothing known yet
    ScenarioStore(path.parent).get("s")
    assert redact.redact_text(text, {}) == "reason: *** and ***"
