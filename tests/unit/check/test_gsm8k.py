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
    from servematrix.checkpoint.forge_spec import TokenizerSpec

    tok = _train_tokenizer(TokenizerSpec(vocab_size=400))
    tok.save_pretrained(tmp_path / "tok")
    context, answer = "Question: 2+2?\nAnswer:", " 2+2 = 4\n#### 4"
    n = len(tok(context + answer)["input_ids"]) - len(tok(context)["input_ids"])
    rows = [{"doc_id": 0, "arguments": {"gen_args_0": {"arg_0": context, "arg_1": answer}},
             "resps": [[[-6.0, False]]]}]
    nll = gsm8k.per_token_nll(_samples(tmp_path / "n.jsonl", rows), str(tmp_path / "tok"))
    assert n > 1 and nll == {0: pytest.approx(6.0 / n)}
