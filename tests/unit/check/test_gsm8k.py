"""The offline gsm8k tasks and the CPU-scale signals computed from lm-eval's samples."""

import json

import pytest
import yaml

from servematrix.check import gsm8k
from servematrix.check.accuracy import agreement_metric


def test_write_task_points_both_tasks_at_the_local_test_set_with_shipped_exemplars(tmp_path):
    task_dir = gsm8k.write_task(tmp_path, num_fewshot=5)
    gen = yaml.safe_load((task_dir / f"{gsm8k.TASK}.yaml").read_text())
    nll = yaml.safe_load((task_dir / f"{gsm8k.NLL_TASK}.yaml").read_text())
    assert gen["dataset_path"] == "json" and gen["dataset_kwargs"]["data_files"]["test"].endswith("gsm8k/test.jsonl")
    assert len(gen["fewshot_config"]["samples"]) == 5 and gen["output_type"] == "generate_until"
    assert [f["name"] for f in gen["filter_list"]] == ["strict-match", "flexible-extract"]
    assert nll["output_type"] == "loglikelihood" and nll["doc_to_text"] == gen["doc_to_text"]
    assert "generation_kwargs" not in nll and nll["fewshot_config"] == gen["fewshot_config"]


def test_command_adds_the_nll_task_only_with_a_tokenizer(tmp_path):
    spec = gsm8k.Gsm8kSpec()
    plain = gsm8k.command("http://h:1", "m", spec, 4, tmp_path)
    with_tok = gsm8k.command("http://h:1", "m", spec, 4, tmp_path, tokenizer="/ckpt")
    assert plain[plain.index("--tasks") + 1] == gsm8k.TASK and "tokenizer_backend=None" in " ".join(plain)
    assert with_tok[with_tok.index("--tasks") + 1] == f"{gsm8k.TASK},{gsm8k.NLL_TASK}"
    assert "tokenizer_backend=huggingface,tokenizer=/ckpt" in " ".join(with_tok)


def _samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answers_take_the_flexible_extract_line_of_each_document(tmp_path):
    rows = [{"doc_id": 0, "filter": "strict-match", "filtered_resps": ["[invalid]"]},
            {"doc_id": 0, "filter": "flexible-extract", "filtered_resps": ["18"]},
            {"doc_id": 1, "filter": "flexible-extract", "filtered_resps": [" 3 "]}]
    assert gsm8k.answers(_samples(tmp_path / "s.jsonl", rows)) == {0: "18", 1: "3"}


def test_agreement_is_judged_per_question_over_the_questions_both_answered():
    m = agreement_metric({0: "18", 1: "3", 2: "5", 3: "7"}, {0: "18", 1: "4", 2: "5", 9: "1"})
    assert (m.mean, m.n) == (pytest.approx(2 / 3), 3)
    assert agreement_metric({0: "1"}, {1: "1"}) is None


def test_per_token_nll_divides_by_the_answer_tokens_as_lm_eval_split_them(tmp_path):
    from servematrix.checkpoint.forge import _train_tokenizer
    from servematrix.config.forge_spec import TokenizerSpec

    tok = _train_tokenizer(TokenizerSpec(vocab_size=400))
    tok.save_pretrained(tmp_path / "tok")
    context, answer = "Question: 2+2?\nAnswer:", " 2+2 = 4\n#### 4"
    n = len(tok(context + answer)["input_ids"]) - len(tok(context)["input_ids"])
    rows = [{"doc_id": 0, "arguments": {"gen_args_0": {"arg_0": context, "arg_1": answer}},
             "resps": [[[-6.0, False]]]}]
    nll = gsm8k.per_token_nll(_samples(tmp_path / "n.jsonl", rows), str(tmp_path / "tok"))
    assert n > 1 and nll == {0: pytest.approx(6.0 / n)}


# --- per question and the protocol fingerprint ------------------------------------------------------
def gen_rows(answers, strict_right=(), flexible_right=()):
    rows = []
    for i, a in enumerate(answers):
        rows.append({"doc_id": i, "filter": "strict-match", "filtered_resps": ["[invalid]"],
                     "exact_match": 1.0 if i in strict_right else 0.0})
        rows.append({"doc_id": i, "filter": "flexible-extract", "filtered_resps": [f" {a} "],
                     "exact_match": 1.0 if i in flexible_right else 0.0})
    return rows


def test_questions_keep_each_answer_and_its_correctness_under_both_filters(tmp_path):
    path = _samples(tmp_path / "s.jsonl", gen_rows(["18", "3", "7"], strict_right={0}, flexible_right={0, 2}))
    qs = gsm8k.questions(path)
    assert [(q.doc_id, q.answer, q.strict, q.flexible, q.nll) for q in qs] == [
        (0, "18", True, True, None), (1, "3", False, False, None), (2, "7", False, True, None)]


def results_dir(tmp_path, n, lm_eval="0.4.13"):
    out = tmp_path / "results" / "m"
    out.mkdir(parents=True)
    (out / "results_2026.json").write_text(json.dumps({
        "results": {gsm8k.TASK: {"exact_match,strict-match": 0.0, "exact_match_stderr,strict-match": 0.0,
                                 "exact_match,flexible-extract": 1 / n, "exact_match_stderr,flexible-extract": 0.1}},
        "n-samples": {gsm8k.TASK: {"original": 1319, "effective": n}}, "lm_eval_version": lm_eval}))
    _samples(out / f"samples_{gsm8k.TASK}_2026.jsonl", gen_rows([str(i) for i in range(n)], flexible_right={0}))
    return tmp_path / "results"


def test_parse_with_the_spec_records_questions_and_the_protocol_fingerprint(tmp_path):
    spec = gsm8k.Gsm8kSpec(max_gen_toks=48, num_fewshot=5)
    g = gsm8k.parse(results_dir(tmp_path, 8), 1.0, spec)
    p = g.protocol
    assert len(g.questions) == 8 and g.questions[0].flexible and not g.questions[1].flexible
    assert (p.question_ids, p.n, p.max_gen_toks, p.seed, p.lm_eval) == ("0-7", 8, 48, gsm8k.SEED, "0.4.13")
    assert len(p.fewshot_ids) == 5 and len(set(p.fewshot_ids)) == 5
    assert p.temperature == 0.0 and "Question:" in p.stop and p.tokenizer is None
    assert len(p.dataset) == 16 and len(p.template) == 16
    assert gsm8k.parse(results_dir(tmp_path / "x", 8), 1.0).protocol is None  # without the spec: as before


def test_the_fingerprint_changes_with_what_was_measured_and_only_with_it(tmp_path):
    spec = gsm8k.Gsm8kSpec(max_gen_toks=48, num_fewshot=5)
    a = gsm8k.protocol(spec, list(range(24)), None, "0.4.13")
    assert a.differences(gsm8k.protocol(spec, list(range(24)), None, "0.4.13")) == []
    fewer = gsm8k.protocol(spec, list(range(8)), None, "0.4.13")
    assert a.differences(fewer) == ["question_ids 0-23 → 0-7", "n 24 → 8"]
    other = gsm8k.protocol(gsm8k.Gsm8kSpec(max_gen_toks=256, num_fewshot=3), list(range(24)), None, "0.4.14")
    changed = [d.split()[0] for d in a.differences(other)]
    assert changed == ["fewshot_ids", "max_gen_toks", "lm_eval"]


def test_the_tokenizer_hash_reads_the_tokenizer_files_only(tmp_path):
    assert gsm8k.tokenizer_hash(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    first = gsm8k.tokenizer_hash(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert gsm8k.tokenizer_hash(str(tmp_path)) == first
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')
    assert gsm8k.tokenizer_hash(str(tmp_path)) != first


def test_question_ids_are_written_as_ranges():
    assert gsm8k.id_ranges([]) == ""
    assert gsm8k.id_ranges([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10"
