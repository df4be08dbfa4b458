"""ERNIE-4.5 MoE with tied word embeddings under pipeline parallelism: servematrix's own repair of a
defect `servematrix sweep` found (docs/sweep-triage.md); no upstream issue or PR exists for it.

`Ernie4_5_MoeModel` builds `embed_tokens` on the first PP rank only, `Ernie4_5_MoeForCausalLM`
builds `lm_head` on the last rank only, and then, when `config.tie_word_embeddings` (true in
baidu/ERNIE-4.5-21B-A3B-PT's config), ties them on every rank. At PP > 1 neither rank has both:
the first dies with `'PPMissingLayer' object has no attribute 'tie_weights'`, the last with
`'PPMissingLayer' object has no attribute 'weight'` (releases before `tie_weights` assign
`lm_head.weight = model.embed_tokens.weight`: the last rank dies the same way). vLLM's Llama has the rule that works (its
model builds `embed_tokens` on the last rank too when the embeddings are tied, and only the last
rank ties); the dense `ernie45.py` is a Llama subclass and inherits it. Every release read here has
the MoE form (`ernie45_moe.py` of 0.18.1, 0.20.2, 0.32.0, 0.33.0 and 0.34.0).

The tie happens inside `Ernie4_5_MoeForCausalLM.__init__`, between the two modules' construction,
so the constructor is wrapped: it runs with the tie turned off, then the last rank builds the
embedding the checkpoint's `model.embed_tokens.weight` loads into (the weight loader asks
`is_pp_missing_parameter`, which is false once the module is real) and ties `lm_head` to it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from servematrix_fixes.base import Fix, State

_MARK = "_servematrix_ernie45_moe_pp_tied"


def _module():
    from vllm.model_executor.models import ernie45_moe

    return ernie45_moe


def init_source(cls) -> str:
    """The constructor as the class's source writes it: vLLM's `support_torch_compile` replaces
    `__init__` with a wrapper that keeps no `__wrapped__`, so the class body is read instead."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    init = next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    return ast.unparse(init) if init is not None else ""


def _builds_embedding_for_the_tie(model_init_source: str) -> bool:
    """Llama's rule in the model's constructor: embed_tokens also where the embeddings are tied."""
    return "tie_word_embeddings" in model_init_source


class Ernie45MoePPTied(Fix):
    name = "ernie45-moe-pp-tied"
    pr = None  # no upstream PR: docs/sweep-triage.md has the write-up
    architectures = ("Ernie4_5_MoeForCausalLM",)
    summary = "build ERNIE-4.5 MoE's tied embedding on the last pipeline stage and tie only there"

    def detect(self) -> tuple[State, str]:
        try:
            m = _module()
            model_init, causal_init = init_source(m.Ernie4_5_MoeModel), init_source(m.Ernie4_5_MoeForCausalLM)
        except (ImportError, AttributeError, OSError, SyntaxError) as exc:
            return "n/a", f"no Ernie4_5_MoeForCausalLM to read in this vLLM ({exc})"
        if "tie_word_embeddings" not in causal_init:  # 0.18-0.2x assign lm_head.weight, later ones call tie_weights
            return "n/a", "Ernie4_5_MoeForCausalLM.__init__ ties no embeddings (not the layout this fix patches)"
        if _builds_embedding_for_the_tie(model_init):
            return "fixed", "Ernie4_5_MoeModel builds embed_tokens where tied embeddings need it"
        return "bug", "Ernie4_5_MoeModel builds embed_tokens on the first PP rank only, and every rank ties lm_head to it"

    def apply(self) -> None:
        cls = _module().Ernie4_5_MoeForCausalLM
        original = cls.__init__
        if getattr(original, _MARK, False):
            return

        @functools.wraps(original)
        def __init__(self, *, vllm_config, prefix: str = ""):
            from vllm.distributed import get_pp_group

            config = vllm_config.model_config.hf_config
            pp = get_pp_group()
            if not getattr(config, "tie_word_embeddings", False) or pp.world_size == 1:
                return original(self, vllm_config=vllm_config, prefix=prefix)
            config.tie_word_embeddings = False  # the original would tie on every rank; tied below, where both exist
            try:
                original(self, vllm_config=vllm_config, prefix=prefix)
            finally:
                config.tie_word_embeddings = True
            if pp.is_last_rank:
                _tie_on_last_rank(self, config, vllm_config.quant_config, prefix)

        setattr(__init__, _MARK, True)
        cls.__init__ = __init__


def _tie_on_last_rank(model, config, quant_config, prefix: str) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

    if isinstance(model.model.embed_tokens, PPMissingLayer):  # not also the first rank
        model.model.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=quant_config,
            prefix=maybe_prefix(maybe_prefix(prefix, "model"), "embed_tokens"))
    model.lm_head = model.lm_head.tie_weights(model.model.embed_tokens)


FIX = Ernie45MoePPTied()
