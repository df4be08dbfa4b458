"""The sweep's coverage counts: cells by verdict, not-checkable reasons, and coverage split by the
registry table each architecture sits in (issue #26: multimodal, pooling, drafts, ... counted apart)."""

from servematrix.record import Expected, Failure, ScenarioRecord
from servematrix.sweep.report import Coverage, coverage_md


def record(arch: str, key: str, kind: str, layout: str, verdict: str, note: str | None = None) -> ScenarioRecord:
    return ScenarioRecord(id=f"{key}/{layout}-none", scenario=key, model=arch, tp=2 if "tp2" in layout else 1, pp=1,
                          quant="none", vllm="current", device="cpu", expect=Expected(), verdict=verdict,
                          tags=[kind, arch], note=note, started_at="t", seconds=1.0,
                          failure=Failure.of("exception", "KeyError: 'x'") if verdict == "fail" else None)


def test_coverage_splits_architectures_by_registry_table_a_failing_cell_counts_as_checked():
    cov = Coverage(release="current", vllm="0.32.0", registered=5, forgeable=3,
                   kinds={"text": 3, "multimodal": 1, "embedding": 1})
    for r in [record("LlamaForCausalLM", "llama", "text", "tp1", "pass"),
              record("LlamaForCausalLM", "llama", "text", "tp2", "pass"),
              record("Qwen3MoeForCausalLM", "qwen3_moe", "text", "tp1", "fail"),
              record("MambaForCausalLM", "mamba", "text", "tp1", "skipped", "not checkable here: mirror: no heads"),
              record("LlavaForConditionalGeneration", "LlavaForConditionalGeneration", "multimodal", "tp1", "skipped",
                     "not checkable here: multimodal"),
              record("BertModel", "BertModel", "embedding", "tp1", "pass")]:
        cov.count(r, None)
    text = coverage_md([cov])
    table = text.split("### By registry table (current): architectures with a checked cell")[1].split("\n\n")[1]
    assert table.splitlines()[2:] == ["| text | 3 | 2 | 67% |", "| embedding | 1 | 1 | 100% |",
                                      "| multimodal | 1 | 0 | 0% |"]
    assert (cov.checked, cov.passing, cov.failing) == (4, 3, 1)
