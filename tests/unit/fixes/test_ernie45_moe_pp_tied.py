"""ernie45-moe-pp-tied: detect() reads this vLLM's ERNIE-4.5 MoE constructors (the bug is in
0.32.0); the rule it looks for is the one vLLM's own Llama model has (embed_tokens also built where
tied embeddings need it), read from vLLM's llama.py, not from a text written here; apply() is
idempotent (registry and detection on 0.32.0: test_registry.py). The repair itself runs in real rank
processes in the seed matrix (tests/integration/test_seed_bugs.py)."""

import inspect

from vllm.model_executor.models import ernie45_moe, llama

from servematrix_fixes import ernie45_moe_pp_tied as fix


def test_llamas_model_constructor_is_the_fixed_form_and_ernies_moe_one_is_not():
    """Both are wrapped by support_torch_compile: the constructors are read from the class bodies."""
    assert fix._builds_embedding_for_the_tie(fix.init_source(llama.LlamaModel))
    assert not fix._builds_embedding_for_the_tie(fix.init_source(ernie45_moe.Ernie4_5_MoeModel))
    assert "tie_weights" in fix.init_source(ernie45_moe.Ernie4_5_MoeForCausalLM)


def test_apply_wraps_the_constructor_once(monkeypatch):
    cls = ernie45_moe.Ernie4_5_MoeForCausalLM
    monkeypatch.setattr(cls, "__init__", cls.__init__)  # restored after the test
    original = cls.__init__
    fix.FIX.apply()
    wrapped = cls.__init__
    fix.FIX.apply()
    assert cls.__init__ is wrapped and wrapped is not original and inspect.unwrap(wrapped) is original
    assert fix.FIX.detect()[0] == "bug"  # detection reads the unwrapped constructor, not the patch
