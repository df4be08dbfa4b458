"""Smoke: greedy prompts through the `openai` client, the scenario's expectations, and parity of
the greedy output with the baseline layout (same checkpoint at TP=1/PP=1).

Parity is judged like vLLM's own `check_logprobs_close`: walk both token sequences; at the first
position where they differ, each side's token must be in the other's top-k logprobs, and the
comparison stops there (the sequences have legitimately diverged on a near-tie). Anything else is
a mismatch: that is what catches a sharding bug that loads fine but computes wrong.
"""

from __future__ import annotations

import re

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openai

from servematrix.config.scenario import SmokePrompt, SmokeSpec
from servematrix.record import Failure, Generation, ParityResult, PromptResult, SmokeResult


def _token_id(token: str) -> int:
    # requested with return_tokens_as_token_ids: "token_id:123" (ids, not strings, are compared)
    return int(token.rsplit(":", 1)[-1])


def _from_completion(choice) -> Generation:
    lp = choice.logprobs
    return Generation(
        text=choice.text,
        token_ids=[_token_id(t) for t in lp.tokens],
        top_logprobs=[{_token_id(k): v for k, v in (d or {}).items()} for d in lp.top_logprobs],
        finish_reason=choice.finish_reason,
    )


def _from_chat(choice) -> Generation:
    content = choice.logprobs.content or []
    return Generation(
        text=choice.message.content or "",
        token_ids=[_token_id(c.token) for c in content],
        top_logprobs=[{_token_id(t.token): t.logprob for t in c.top_logprobs} for c in content],
        finish_reason=choice.finish_reason,
    )


def generate(client: openai.OpenAI, model: str, p: SmokePrompt, top_k: int) -> tuple[str, Generation]:
    extra = {"return_tokens_as_token_ids": True}
    if p.prompt is not None:
        r = client.completions.create(model=model, prompt=p.prompt, max_tokens=p.max_tokens,
                                      temperature=0.0, logprobs=top_k, extra_body=extra)
        return "completions", _from_completion(r.choices[0])
    r = client.chat.completions.create(model=model, messages=p.messages, max_tokens=p.max_tokens,
                                       temperature=0.0, logprobs=True, top_logprobs=top_k, extra_body=extra)
    return "chat", _from_chat(r.choices[0])


def judge(p: SmokePrompt, g: Generation) -> list[str]:
    """The prompt's expectations that `g` does not meet (empty list: all met)."""
    problems = []
    if not g.token_ids:
        problems.append("empty completion")
    for needle in p.expect.contains:
        if needle.lower() not in g.text.lower():
            problems.append(f"expected {needle!r} in {g.text!r}")
    if p.expect.regex and not re.search(p.expect.regex, g.text):
        problems.append(f"expected /{p.expect.regex}/ to match {g.text!r}")
    if p.expect.min_tokens and len(g.token_ids) < p.expect.min_tokens:
        problems.append(f"expected >= {p.expect.min_tokens} tokens, got {len(g.token_ids)}")
    return problems


def logprobs_close(a: Generation, b: Generation) -> str | None:
    """None when `a` and `b` agree in vLLM's sense, else why not."""
    for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
        if ta == tb:
            continue
        if ta in b.top_logprobs[i] and tb in a.top_logprobs[i]:
            return None  # a near-tie: both choices plausible to both sides, sequences diverge here
        return (f"token {i}: {ta} vs baseline {tb}, and not in each other's top-{len(a.top_logprobs[i])} "
                f"({a.text!r} vs baseline {b.text!r})")
    if len(a.token_ids) != len(b.token_ids):
        return f"length {len(a.token_ids)} vs baseline {len(b.token_ids)} with equal prefix"
    return None


def parity(results: list[PromptResult], baseline: dict[str, Generation], baseline_id: str) -> ParityResult:
    details, ok = [], True
    for r in results:
        base = baseline.get(r.name)
        if base is None or r.generation is None:
            ok = False
            details.append(f"{r.name}: no {'baseline ' if base is None else ''}generation to compare")
            continue
        why = logprobs_close(r.generation, base)
        if why:
            ok = False
            details.append(f"{r.name}: {why}")
    return ParityResult(ok=ok, baseline=baseline_id, details=details)


def run_smoke(base_url: str, model: str, spec: SmokeSpec) -> SmokeResult:
    """The scenario's prompts and expectations; parity with a baseline is compare.py's, made from
    the two records afterwards."""
    import openai  # 0.35 s: paid by the process that sends prompts, not by every reader of records

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="servematrix",
                           timeout=spec.request_timeout, max_retries=0)
    results: list[PromptResult] = []
    for p in spec.prompts:
        try:
            endpoint, g = generate(client, model, p, spec.parity.top_k)
        except (openai.APIError, openai.APIConnectionError) as exc:
            results.append(PromptResult(name=p.name, endpoint="chat" if p.messages else "completions",
                                        ok=False, problems=[f"request failed: {exc}"]))
            return SmokeResult(ok=False, prompts=results, error=f"{p.name}: request failed: {exc}")
        problems = judge(p, g)
        results.append(PromptResult(name=p.name, endpoint=endpoint, ok=not problems, text=g.text,
                                    problems=problems, generation=g))
    return SmokeResult(ok=all(r.ok for r in results), prompts=results)


def smoke_failure(smoke: SmokeResult) -> Failure | None:
    """The failure a smoke result stands for: a transport error (the pipeline first asks whether
    the server died), else the first problem of a prompt or of parity."""
    if smoke.error:
        return Failure.of("exception", smoke.error[:400], "smoke")
    if smoke.ok:
        return None
    problems = [pr for p in smoke.prompts for pr in p.problems]
    if smoke.parity is not None and not smoke.parity.ok:
        problems += [f"parity with {smoke.parity.baseline}: {d}" for d in smoke.parity.details]
    return Failure.of("check", problems[0][:400] if problems else "smoke failed", "smoke")
