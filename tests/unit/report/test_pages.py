"""A scenario page's "log around the failure": an accuracy failure is explained by its checks' own
figures and by the server log while lm-eval ran (the lines around its first error or warning),
never by the shutdown tail; a load or crash failure keeps the lines around its signature."""

from __future__ import annotations

from servematrix.check.accuracy import judge
from servematrix.config.references import Check, RefKey, Reference
from servematrix.record import Failure, LoadResult, MetricValue, RunSummary, ScenarioRecord
from servematrix.report import html as report_html
from servematrix.report import pages

from .test_report import rec

SID = "s/tp3-pp1-fp32"
REF = Reference(key=RefKey(scenario="s", quant="fp32"), metric="gsm8k.nll", mean=1.4105, sigma=0.32, n=24)
API = "(APIServer pid=31948)"
# the shapes of a real vLLM 0.32.0 server.log of a gsm8k run (evidence/gate-2/paired): start-up
# warnings, then lm-eval's requests, then the shutdown with its own warnings and nanobind's noise
STARTUP = [f"{API} INFO 12-01 17:23:01 [api_utils.py:347] version 0.32.0",
           f"{API} WARNING 12-01 17:23:01 [system_utils.py:255] Found ulimit of 20000 and failed to increase",
           "[W1201 17:23:39.880279729 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
           "INFO:     Application startup complete.",
           'INFO:     127.0.0.1:44412 - "POST /v1/chat/completions HTTP/1.1" 200 OK']
SHUTDOWN = ["(EngineCore pid=32223) INFO 12-01 17:43:40 [core.py:1454] [shutdown] EngineCore: trigger received "
            "signal=SIGTERM",
            f"{API} WARNING 12-01 17:43:40 [utils.py:648] [shutdown] Process manager: force killing remaining "
            "processes count=1",
            "INFO:     Shutting down",
            "nanobind: leaked 4 instances!",
            " - leaked instance 0x7ff6602f9428 of type \"triton._C.libtriton.ir.attribute\"",
            "UserWarning: resource_tracker: There appear to be 3 leaked semaphore objects to clean up at shutdown"]
LM_EVAL = ["2026-12-01:17:24:14 WARNING  [config.evaluate_config:337] --limit SHOULD ONLY BE USED FOR TESTING.",
           "Requesting API:   0%|          | 0/24 [00:00<?, ?it/s]\rRequesting API: 100%|#| 24/24",
           "2026-12-01:17:43:32 INFO     [loggers.evaluation_tracker:247] Saving results aggregated"]


def serving(minute: int, n: int = 15, status: int = 200) -> list[str]:
    out = []
    for i in range(n):
        out.append(f'INFO:     127.0.0.1:35874 - "POST /v1/completions HTTP/1.1" {status} OK')
        out.append(f"{API} INFO 12-01 17:{minute:02d}:{i * 3 + 10:02d} [loggers.py:335] Engine 000: Avg prompt "
                   "throughput: 68.7 tokens/s, Running: 0 reqs")
    return out


def failed_record() -> ScenarioRecord:
    check = judge(Check(metric="gsm8k.nll", effect=0.25), MetricValue(mean=1.742, sigma=0.32, stderr=0.07, n=24), REF)
    assert check.status == "fail"
    return rec(SID, tp=3, verdict="fail", load=LoadResult(ok=True), accuracy=[check],
               failure=Failure.of("check", check.summary()[:400], "accuracy"))


def write_logs(tmp_path, server: list[str], lm_eval: list[str] | None = LM_EVAL):
    (tmp_path / SID / "gsm8k").mkdir(parents=True)
    (tmp_path / SID / "server.log").write_text("\n".join(server) + "\n")
    if lm_eval is not None:
        (tmp_path / SID / "gsm8k" / "lm_eval.log").write_text("\n".join(lm_eval) + "\n")


def page(tmp_path, r: ScenarioRecord) -> str:
    s = RunSummary(matrix="m", run_dir=str(tmp_path), host="h", vllm_version="0.32.0", torch_version="t",
                   servematrix_version="0", started_at="t", scenarios=[r])
    return pages.render(s, r)


WARNING = f"{API} WARNING 12-01 17:30:05 [serving.py:210] The prompt is longer than max_model_len: truncated"


def test_an_accuracy_failure_shows_its_figures_and_the_first_warning_while_lm_eval_ran(tmp_path):
    log = STARTUP + serving(24) + serving(27) + [WARNING] + serving(33) + serving(40) + SHUTDOWN
    write_logs(tmp_path, log)
    r = failed_record()
    name, lines = pages.log_excerpt(tmp_path, r)
    hit = log.index(WARNING) + 1
    assert name == "server.log" and [n for n, _, h in lines if h] == [hit]
    assert lines[0][0] == hit - pages.CONTEXT and lines[-1][0] == hit + pages.CONTEXT
    text = page(tmp_path, r)
    # the check's own figures: measured vs reference, n, threshold, MDE, p-value
    c = r.accuracy[0]
    assert 'id="why"' in text and (f"gsm8k.nll: 1.7420 (n=24) vs ref 1.4105; need &lt;= {c.threshold:.4f}; "
                                   f"MDE {c.mde:.4f}; p={c.p_value:.3g}") in text
    assert "reference measured over n=24" in text
    assert f"its first error, warning or refused request is line {hit}" in text and "The prompt is longer than max_model_len" in text
    # the start-up warnings came before lm-eval; the shutdown and nanobind's noise after it
    for noise in ("Found ulimit", "NUMA binding", "[shutdown]", "nanobind", "leaked semaphore"):
        assert noise not in text, noise


def test_with_no_warning_while_lm_eval_ran_no_log_lines_are_shown_only_how_it_answered(tmp_path):
    log = STARTUP + serving(24) + serving(40) + SHUTDOWN
    write_logs(tmp_path, log)
    r = failed_record()
    assert pages.log_excerpt(tmp_path, r) == ("server.log", [])
    ev = pages.evaluation(tmp_path, r)
    # lm-eval ran 17:24:14-17:43:32: the window starts at the first line logged then, ends before the shutdown
    first = next(i for i, line in enumerate(log) if "17:24:16" in line) + 1
    assert (ev.first, ev.last) == (first, log.index(SHUTDOWN[0]))
    assert (ev.since, ev.until) == ("12-01 17:24:14", "12-01 17:43:32")
    # an access line has the time of the line before it: the first 3 requests (17:24:10-13) came before
    # lm-eval started, the smoke's (17:23) too
    assert (ev.answered, ev.refused) == (12 + 15, 0)
    text = page(tmp_path, r)
    assert "27 requests answered, 0 refused (HTTP ≥ 400); no error or warning." in text
    assert 'id="log"' not in text and "nanobind" not in text and "[shutdown]" not in text


def test_a_refused_request_while_lm_eval_ran_is_the_line_shown(tmp_path):
    refused = serving(30, status=500)[:4]  # two "500" responses
    log = STARTUP + serving(24) + refused + serving(40) + SHUTDOWN
    write_logs(tmp_path, log)
    ev = pages.evaluation(tmp_path, failed_record())
    assert (ev.answered, ev.refused) == (12 + 15, 2)
    assert [n for n, _, hit in ev.lines if hit] == [log.index(refused[0]) + 1]


def test_without_lm_evals_times_the_window_is_the_log_before_the_shutdown(tmp_path):
    log = STARTUP[:1] + serving(24) + SHUTDOWN
    write_logs(tmp_path, log, lm_eval=None)
    ev = pages.evaluation(tmp_path, failed_record())
    assert (ev.first, ev.last, ev.since, ev.lines) == (1, log.index(SHUTDOWN[0]), None, [])
    assert "up to the shutdown" in page(tmp_path, failed_record())


def test_lm_evals_times_that_match_no_server_line_fall_back_to_the_log_before_the_shutdown(tmp_path):
    log = STARTUP[:1] + serving(24) + [WARNING] + SHUTDOWN  # lm-eval's log five hours off (another time zone)
    write_logs(tmp_path, log, lm_eval=[x.replace(":17:", ":12:") for x in LM_EVAL])
    ev = pages.evaluation(tmp_path, failed_record())
    assert (ev.first, ev.last, ev.since, ev.answered) == (1, log.index(SHUTDOWN[0]), None, 15)
    assert [n for n, _, hit in ev.lines if hit] == [log.index(WARNING) + 1]


def test_a_load_failure_keeps_the_lines_around_its_signature(tmp_path):
    crash = "(EngineCore pid=32223) ERROR 12-01 17:23:30 [core.py:700] KeyError: 'layers.0.self_attn.qkv_proj.k_scale'"
    log = STARTUP + [crash] + SHUTDOWN
    write_logs(tmp_path, log)
    sig = "KeyError: 'layers.0.self_attn.qkv_proj.k_scale'"
    r = rec(SID, verdict="fail", failure=Failure.of("exception", sig), load=LoadResult(ok=False))
    name, lines = pages.log_excerpt(tmp_path, r)
    assert name == "server.log" and [t for _, t, h in lines if h] == [crash]
    assert 'id="why"' not in page(tmp_path, r)


def test_the_failures_table_lists_every_failed_checks_figures(tmp_path):
    r = failed_record()
    agreement = judge(Check(metric="gsm8k.agreement", effect=0.15), MetricValue(mean=0.125, sigma=0.33, stderr=0.07,
                                                                                 n=24),
                      Reference(key=REF.key, metric="gsm8k.agreement", mean=1.0, sigma=0.0, n=24))
    r = r.model_copy(update={"accuracy": [*r.accuracy, agreement]})
    s = RunSummary(matrix="m", run_dir=str(tmp_path), host="h", vllm_version="0.32.0", torch_version="t",
                   servematrix_version="0", started_at="t", scenarios=[r])
    table = report_html.failures(s)
    assert "gsm8k.nll: 1.7420 (n=24)" in table and "gsm8k.agreement: 0.1250 (n=24)" in table


def test_a_waivers_upstream_bug_is_a_link_and_a_write_up_is_named_not_linked_into_the_void(tmp_path):
    from servematrix.record import Expected

    def waiver(bug):
        return page(tmp_path, rec(SID, verdict="xfail", expect=Expected(expect="xfail", reason="r", bug=bug)))

    assert '<a href="https://github.com/vllm-project/vllm/issues/50961">bug</a>' in waiver(
        "https://github.com/vllm-project/vllm/issues/50961")
    text = waiver("docs/sweep-triage.md#x")  # relative to the repository, which a report's folder is not in
    assert "bug: <code>docs/sweep-triage.md#x</code>" in text and 'href="docs/' not in text
