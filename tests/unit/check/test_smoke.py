"""Greedy parity with the baseline, judged like vLLM's check_logprobs_close."""

from servematrix.check.smoke import logprobs_close, parity
from servematrix.record import Generation, PromptResult


def gen(ids, tops, text="t"):
    return Generation(text=text, token_ids=ids, top_logprobs=tops)


def test_identical_tokens_agree():
    a = gen([1, 2, 3], [{1: -0.1}, {2: -0.1}, {3: -0.1}])
    assert logprobs_close(a, a) is None


def test_a_near_tie_where_each_token_is_in_the_others_top_k_agrees_and_stops_comparing():
    a = gen([1, 5, 9], [{1: -0.1}, {5: -0.69, 6: -0.70}, {9: 0}])
    b = gen([1, 6, 7], [{1: -0.1}, {6: -0.69, 5: -0.70}, {7: 0}])
    assert logprobs_close(a, b) is None


def test_a_divergence_outside_top_k_is_a_mismatch_naming_the_position():
    a = gen([1, 5], [{1: -0.1}, {5: -0.1, 6: -3.0}])
    b = gen([1, 8], [{1: -0.1}, {8: -0.1, 9: -3.0}])
    why = logprobs_close(a, b)
    assert why is not None and why.startswith("token 1: 5 vs baseline 8")


def test_one_sided_top_k_membership_is_not_enough():
    a = gen([5], [{5: -0.1, 8: -0.2}])
    b = gen([8], [{8: -0.1, 9: -0.2}])
    assert logprobs_close(a, b) is not None


def test_parity_over_prompts_reports_each_mismatch_and_missing_baseline():
    good = gen([1], [{1: 0.0}])
    bad = gen([2], [{2: 0.0}])
    results = [PromptResult(name="a", endpoint="completions", ok=True, generation=good),
               PromptResult(name="b", endpoint="chat", ok=True, generation=bad),
               PromptResult(name="c", endpoint="chat", ok=True, generation=good)]
    res = parity(results, {"a": good, "b": good}, "x/tp1-pp1-fp32")
    assert not res.ok and res.baseline == "x/tp1-pp1-fp32"
    assert [d.split(":")[0] for d in res.details] == ["b", "c"]
